#![no_std]
//! Kernel-side programs live in the `forwarder` binary target (src/main.rs); this empty
//! library lets forwarder-user name the crate as a build dependency.
