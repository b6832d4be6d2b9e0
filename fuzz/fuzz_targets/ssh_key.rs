//! Fuzzes SSH public keys as people paste them: `PublicKey::parse` never
//! panics, a key it accepts prints (`openssh()`) to text that parses back
//! to the same key, and `request-access TEXT` never panics either.
#![no_main]

use kennel_core::keys::PublicKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = PublicKey::parse(text) {
        let back = PublicKey::parse(k.openssh()).expect("a printed key parses");
        assert_eq!(back.fingerprint(), k.fingerprint());
        assert_eq!(back.openssh(), k.openssh());
    }
    let _ = kennel_core::parse(&format!("request-access {text}"));
});
