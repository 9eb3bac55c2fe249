use which::which;

/// Rebuild the object when bpf-linker changes (aya-template does the same).
fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which turns off LLVM's
    // inline expansion of memset and memmove: every zeroed or copied address became a call
    // to a byte-at-a-time loop (compiler_builtins'), on every new flow's path. Without it,
    // LLVM expands all three into word loads and stores where it knows the alignment.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
