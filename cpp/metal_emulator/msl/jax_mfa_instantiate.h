// JAX_MFA_INSTANTIATE_KERNEL(host_name, function, template args...)
//
// Makes one instantiation of a kernel template available under `host_name`.
// With Apple's compiler it is an explicit instantiation carrying
// [[host_name(...)]]; in the jax_mfa Metal emulator it registers the same
// instantiation in the emulator's name -> kernel table (the parameter bindings
// come from the glue generated for `function`). Both paths look kernels up by
// the same name. Use it at namespace scope after the kernel template.
#pragma once

#if defined(__METAL_VERSION__)
#define JAX_MFA_INSTANTIATE_KERNEL(name, function, ...) \
  template [[host_name(name)]] [[kernel]] decltype(function<__VA_ARGS__>) function<__VA_ARGS__>;
#else
// JAX_MFA_EMU_REGISTER_KERNEL comes from the emulator's metal_compat.h.
#define JAX_MFA_INSTANTIATE_KERNEL(name, function, ...) JAX_MFA_EMU_REGISTER_KERNEL(name, function, __VA_ARGS__)
#endif
