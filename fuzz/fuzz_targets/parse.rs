//! Fuzzes the command language: no input may panic, and whatever parses
//! must print to a line that parses back to the same invocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inv) = kennel_core::parse(text) {
        let line = inv.to_string();
        let back = kennel_core::parse(&line);
        assert_eq!(back.as_ref().ok(), Some(&inv), "{line}");
    }
});
