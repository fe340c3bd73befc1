// The bf16 instantiations of metal/attention.metal, as their own translation
// unit for the emulated build (compiled in parallel with the other types).
// The Metal build compiles attention.metal itself, with every type.
#define JAX_MFA_METAL_DTYPES 4
#include "attention.metal"
