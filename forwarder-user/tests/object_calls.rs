//! The per-packet code of the kernel objects calls no byte-loop subprogram. LLVM's BPF
//! backend lowers some copies and clears of byte arrays into calls to compiler_builtins'
//! `memmove`/`memset` (a loop of one-byte moves, one call and return per use), which on the
//! established-flow fast path or in the bench's ceiling and generator would cost more than
//! the work around them. Checked on the objects `forwarder` embeds, from their relocations.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

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

#[test]
fn the_fast_path_calls_no_byte_loop() {
    assert_no_byte_loops(forwarder::EBPF_OBJECT, "try_cached_out_of_line");
    assert_no_byte_loops(forwarder::EBPF_OBJECT, "forwarder_xdp");
}

#[test]
fn the_bench_programs_call_no_byte_loop() {
    for program in [
        "bench_redirect_only",
        "bench_lookup_redirect_40",
        "bench_lookup_redirect_16",
        "bench_trafficgen",
        "bench_sink",
        "bench_sink_tc",
    ] {
        assert_no_byte_loops(forwarder::BENCH_OBJECT, program);
    }
}

/// The check itself finds such calls: the full path still has some (new flows only).
#[test]
fn byte_loop_calls_are_found_where_they_are() {
    let calls = calls_of(forwarder::EBPF_OBJECT, "not_cached");
    assert!(calls.iter().any(|c| BYTE_LOOPS.contains(&c.as_str())), "{calls:?}");
}
