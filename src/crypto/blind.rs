//! Blind indexes: exact-match search over encrypted elements without decrypting them, and the text
//! normalisation shared with FHIR string search.
//!
//! `index = hex(HMAC-SHA256(K_{type,param}, value)[..2])`, with `K_{type,param}` derived from the index key by
//! HKDF-SHA256 (salt `carevault/blind-index/v1`, info = length-prefixed resource type and parameter name), so
//! equal values under different parameters or resource types are unlinkable. The output is deliberately
//! truncated to [`BLIND_INDEX_BITS`]: distinct values collide, which hides equality and frequency in a stolen
//! database; a search fetches the rows with a matching index, decrypts the element and keeps the exact matches,
//! so results are exact. `docs/encryption.md` gives the reasoning for the length.

use super::master::{KEY_LEN, hex, hmac_sha256};
use super::push_part;
use hkdf::Hkdf;
use sha2::Sha256;
use std::fmt;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;
use zeroize::Zeroizing;

/// Bits of HMAC output kept. CipherSweet's planner asks for `2 <= R / 2^L <= sqrt(R)` coincidences over `R`
/// indexed values; 16 bits satisfies that from `R = 2^17` (131 072) to `R = 2^32` index rows per parameter.
pub const BLIND_INDEX_BITS: u32 = 16;
const BLIND_INDEX_BYTES: usize = (BLIND_INDEX_BITS / 8) as usize;
/// Versioned: a change of derivation or length needs a new salt and a rebuild of the index rows.
const HKDF_SALT: &[u8] = b"carevault/blind-index/v1";

/// Computes blind indexes under keys derived from the index key. `Debug` prints nothing secret.
pub struct BlindIndexer {
    /// HKDF pseudo-random key extracted from the index key.
    prk: Zeroizing<[u8; KEY_LEN]>,
}

impl BlindIndexer {
    pub(crate) fn new(index_key: &[u8; KEY_LEN]) -> Self {
        let (prk, _) = Hkdf::<Sha256>::extract(Some(HKDF_SALT), index_key);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&prk);
        Self { prk: key }
    }

    /// The blind index of `normalized_value` for search parameter `param` of `resource_type`: lowercase hex,
    /// `BLIND_INDEX_BITS / 4` characters. Pass values through [`normalize_text`] / [`words`] (strings) or the
    /// token rules of the search code first; the same input always gives the same index.
    pub fn index(&self, resource_type: &str, param: &str, normalized_value: &str) -> String {
        let subkey = self.subkey(resource_type, param);
        let mac = hmac_sha256(&subkey, normalized_value.as_bytes());
        hex(&mac[..BLIND_INDEX_BYTES])
    }

    /// HKDF-Expand for one 32-byte block: `T(1) = HMAC(PRK, info || 0x01)` (RFC 5869 §2.3).
    fn subkey(&self, resource_type: &str, param: &str) -> Zeroizing<[u8; KEY_LEN]> {
        let mut info = Vec::with_capacity(24 + resource_type.len() + param.len());
        push_part(&mut info, resource_type.as_bytes());
        push_part(&mut info, param.as_bytes());
        info.push(0x01);
        Zeroizing::new(hmac_sha256(&self.prk, &info))
    }
}

impl fmt::Debug for BlindIndexer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlindIndexer").field("bits", &BLIND_INDEX_BITS).finish_non_exhaustive()
    }
}

/// Case-, accent- and spacing-insensitive form of a string, as FHIR string search compares them: Unicode NFKD
/// (compatibility forms such as ligatures and full-width letters fold too), combining marks dropped, lowercase
/// (with `ß` → `ss` and final `ς` → `σ`, as in case folding), whitespace runs collapsed to one space, trimmed.
/// Letters without a decomposition (`ø`, `ł`, `æ`) are kept as they are.
pub fn normalize_text(text: &str) -> String {
    let mut folded = String::with_capacity(text.len());
    for c in text.nfkd().filter(|c| !is_combining_mark(*c)) {
        match c {
            'ß' | 'ẞ' => folded.push_str("ss"),
            'ς' => folded.push('σ'),
            _ => folded.extend(c.to_lowercase()),
        }
    }
    // Lowercasing can reintroduce a combining mark (U+0130 → i + U+0307); decompose and drop again.
    let folded: String = folded.nfkd().filter(|c| !is_combining_mark(*c)).collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The distinct normalized words of `text` in order of first appearance: [`normalize_text`], then split at
/// anything that is not a letter or digit (so `Smith-Jones` gives `smith`, `jones`).
pub fn words(text: &str) -> Vec<String> {
    let normalized = normalize_text(text);
    let mut out: Vec<String> = Vec::new();
    for word in normalized.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if !out.iter().any(|seen| seen == word) {
            out.push(word.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indexer(byte: u8) -> BlindIndexer {
        BlindIndexer::new(&[byte; KEY_LEN])
    }

    #[test]
    fn normalisation_folds_case_accents_and_whitespace() {
        assert_eq!(normalize_text("  José \t GARCÍA\n"), "jose garcia");
        assert_eq!(normalize_text("Ångström"), "angstrom");
        assert_eq!(normalize_text("Zoë"), normalize_text("Zoe\u{0308}"));
        assert_eq!(normalize_text("ZOË"), "zoe");
        assert_eq!(normalize_text("Straße"), "strasse");
        assert_eq!(normalize_text("İstanbul"), "istanbul");
        assert_eq!(normalize_text("ﬁnn\u{00a0}ＭＡＲＹ"), "finn mary");
        assert_eq!(normalize_text("O'Brien"), "o'brien");
        assert_eq!(normalize_text("Søren"), "søren");
        assert_eq!(normalize_text(" \t "), "");
    }

    #[test]
    fn words_are_normalized_distinct_and_split_at_punctuation() {
        assert_eq!(words("Smith-Jones, Mary  MARY"), vec!["smith", "jones", "mary"]);
        assert_eq!(words("  Renée  "), vec!["renee"]);
        assert!(words(" -- ").is_empty());
    }

    #[test]
    fn index_is_stable_short_hex() {
        let a = indexer(1).index("Patient", "family", "smith");
        assert_eq!(a, indexer(1).index("Patient", "family", "smith"));
        assert_eq!(a.len(), (BLIND_INDEX_BITS / 4) as usize);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn index_is_distinct_per_type_param_and_key() {
        // With 16-bit output two unrelated inputs collide with probability 2^-16; compare several values so a
        // single chance collision cannot make the test pass or fail.
        let values = ["smith", "jones", "garcia", "nguyen", "müller", "1970-01-01"];
        let row = |ix: &BlindIndexer, t: &str, p: &str| values.map(|v| ix.index(t, p, v));
        let base = row(&indexer(1), "Patient", "family");
        assert_ne!(base, row(&indexer(1), "Patient", "given"));
        assert_ne!(base, row(&indexer(1), "Practitioner", "family"));
        assert_ne!(base, row(&indexer(2), "Patient", "family"));
        // Length-prefixed derivation: ("Patientf", "amily") is not ("Patient", "family").
        assert_ne!(base, row(&indexer(1), "Patientf", "amily"));
    }

    #[test]
    fn subkey_is_rfc5869_hkdf() {
        let ix = indexer(7);
        let mut info = Vec::new();
        push_part(&mut info, b"Patient");
        push_part(&mut info, b"family");
        let mut expected = [0u8; 32];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), &[7u8; KEY_LEN]).expand(&info, &mut expected).unwrap();
        assert_eq!(*ix.subkey("Patient", "family"), expected);
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let ix = indexer(0xab);
        let shown = format!("{ix:?}");
        let as_list = format!("{:?}", &ix.prk[..2]);
        assert!(!shown.contains(&hex(&ix.prk[..4])) && !shown.contains(as_list.trim_end_matches(']')), "{shown}");
        assert!(shown.starts_with("BlindIndexer"));
    }
}
