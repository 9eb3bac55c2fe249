//! The kernel objects call no byte-loop subprogram. bpf-linker's default
//! (`--bpf-expand-memcpy-in-order`) keeps LLVM from expanding memset and memmove inline, and
//! every copy or clear of a byte array it could not prove disjoint became a call to
//! compiler_builtins' `memmove`/`memset` (a loop of one-byte moves): a dozen per new flow
//! on the full path. forwarder-ebpf's build.rs turns that default off; this checks that it
//! stays off, on every function of the objects `forwarder` embeds, from their relocations.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

const BYTE_LOOPS: [&str; 4] = ["memmove", "memcpy", "memset", "memcmp"];

/// Names of the functions that `function` (a symbol whose name contains it) calls through
/// relocations.
fn calls_of(elf: &[u8], function: &str) -> Vec<String> {
    let file = object::File::parse(elf).expect("an ELF object");
    let sym = file
        .symbols()
        .find(|s| s.is_definition() && s.name().is_ok_and(|n| n.contains(function)))
        .unwrap_or_else(|| panic!("no function {function}"));
    let section = file.section_by_index(sym.section_index().expect("in a section")).unwrap();
    let range = sym.address()..sym.address() + sym.size();
    assert!(sym.size() > 0, "{function} has a size");
    section
        .relocations()
        .filter(|(offset, _)| range.contains(offset))
        .filter_map(|(_, r)| match r.target() {
            RelocationTarget::Symbol(i) => file.symbol_by_index(i).ok()?.name().ok().map(str::to_owned),
            _ => None,
        })
        .collect()
}

fn assert_no_byte_loops(elf: &[u8], function: &str) {
    let calls = calls_of(elf, function);
    let loops: Vec<_> = calls.iter().filter(|c| BYTE_LOOPS.contains(&c.as_str())).collect();
    assert!(loops.is_empty(), "{function} calls {loops:?}");
}

/// The functions an object defines (programs and their subprograms), byte loops aside.
fn functions(elf: &[u8]) -> Vec<String> {
    let file = object::File::parse(elf).expect("an ELF object");
    file.symbols()
        .filter(|s| s.is_definition() && s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|n| !BYTE_LOOPS.contains(&n.as_str()) && n != "bcmp")
        .collect()
}

#[test]
fn no_function_calls_a_byte_loop() {
    for (object, at_least) in [
        (forwarder::EBPF_OBJECT, &["not_cached", "try_cached_out_of_line", "forwarder_xdp"][..]),
        (forwarder::BENCH_OBJECT, &["bench_trafficgen", "bench_sink", "bench_redirect_only", "bench_redirect_only_tc"]),
    ] {
        let functions = functions(object);
        for f in at_least {
            assert!(functions.iter().any(|n| n.contains(f)), "{f} among {functions:?}");
        }
        for f in &functions {
            assert_no_byte_loops(object, f);
        }
    }
}

/// The check reads calls at all: the full path's map relocations are found.
#[test]
fn calls_are_read_from_relocations() {
    let calls = calls_of(forwarder::EBPF_OBJECT, "not_cached");
    assert!(calls.iter().any(|c| c == "FWD_CT_V4"), "{calls:?}");
    let calls = calls_of(forwarder::EBPF_OBJECT, "free_port_step");
    assert!(calls.iter().any(|c| c == "FWD_CT_V4"), "{calls:?}");
}
