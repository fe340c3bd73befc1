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
#define JAX_MFA_EMU_CAT2(a, b) a##b
#define JAX_MFA_EMU_CAT(a, b) JAX_MFA_EMU_CAT2(a, b)
#define JAX_MFA_INSTANTIATE_KERNEL(name, function, ...)                                  \
  static ::metal::detail::KernelRegistrar JAX_MFA_EMU_CAT(jax_mfa_emu_reg_, __COUNTER__)( \
      name, &function<__VA_ARGS__>, JAX_MFA_EMU_CAT(jax_mfa_emu_bind_, function),          \
      JAX_MFA_EMU_CAT(jax_mfa_emu_nbind_, function));
#endif
