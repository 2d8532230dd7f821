//! Guest image: kernel, initramfs and root filesystem for microVMs (built by a helper).
