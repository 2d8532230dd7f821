//! The microVM tier: each instance is a QEMU `microvm` guest (KVM when the host has it, TCG
//! software emulation otherwise) whose init is the Skiff agent.

pub mod image;
