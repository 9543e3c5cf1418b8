//! Login token verification on arbitrary bytes: never a panic, and never accepted (the fuzzer
//! does not know the key, so an accepted token would be a forgery).
#![no_main]

use gatehouse::auth::TokenKeys;
use gatehouse::ids::{DeviceId, UserId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = TokenKeys::new([7u8; 32], Some([9u8; 32]));
    let (ids, token) = data.split_at(data.len().min(12));
    let mut id = [0u8; 12];
    id[..ids.len()].copy_from_slice(ids);
    let user = UserId(u64::from_le_bytes(id[..8].try_into().unwrap()));
    let device = DeviceId(u32::from_le_bytes(id[8..].try_into().unwrap()));
    assert!(keys.verify(token, user, device, 1_700_000_000).is_err());
    // A real token for the same ids still verifies (the parser is not confused by state).
    let good = keys.mint(user, device, 1_800_000_000);
    if user.0 != 0 {
        assert!(keys.verify(good.as_bytes(), user, device, 1_700_000_000).is_ok());
    }
});
