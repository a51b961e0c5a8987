//! The ClientHello parser a TLS listener runs on every new connection: any bytes, split
//! anywhere, end in a hello, a need for more, or a refusal, never a panic.
#![no_main]

use edgeproxy::adapters::inbound::tls_hello::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the bytes arrive split, as TCP may deliver them.
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let mut parser = Parser::default();
    let cut = usize::from(split) % (bytes.len() + 1);
    if let Ok(None) = parser.feed(&bytes[..cut]) {
        let _ = parser.feed(bytes);
    }
});
