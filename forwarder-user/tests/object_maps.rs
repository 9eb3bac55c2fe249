//! Every map of the embedded kernel object is either pinned (state that outlives the
//! process and that the next instance adopts) or listed as belonging to one loaded program
//! set; a map on neither list would silently lose its state at every restart. Read from the
//! object's `maps` section, where aya-ebpf puts every `#[map]` under its map name.

use std::collections::BTreeSet;

use forwarder::pins::{PINNED_MAPS, UNPINNED_MAPS};
use object::{Object, ObjectSection, ObjectSymbol};

fn maps_of(elf: &[u8]) -> BTreeSet<String> {
    let file = object::File::parse(elf).expect("an ELF object");
    let section = file.section_by_name("maps").expect("a maps section").index();
    file.symbols()
        .filter(|s| s.section_index() == Some(section))
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect()
}

#[test]
fn every_map_is_pinned_or_listed_as_unpinned() {
    let declared = maps_of(forwarder::EBPF_OBJECT);
    assert!(declared.contains(forwarder_common::FWD_RULES_V2), "the forward rules are in {declared:?}");
    let pinned: BTreeSet<String> = PINNED_MAPS.iter().map(|s| s.to_string()).collect();
    let unpinned: BTreeSet<String> = UNPINNED_MAPS.iter().map(|s| s.to_string()).collect();
    assert!(pinned.is_disjoint(&unpinned), "a map on both lists: {:?}", pinned.intersection(&unpinned));
    let unlisted: Vec<_> = declared.iter().filter(|m| !pinned.contains(*m) && !unpinned.contains(*m)).collect();
    assert!(unlisted.is_empty(), "maps of the object neither pinned nor listed as unpinned: {unlisted:?}");
    let absent: Vec<_> = pinned.union(&unpinned).filter(|m| !declared.contains(*m)).collect();
    assert!(absent.is_empty(), "listed maps the object does not declare: {absent:?}");
}
