//! Text normalization for string search: the same function prepares indexed values and query values, so a
//! match never depends on case, accents, compatibility forms or spacing.
//!
//! (The crypto module has its own copy for blind indexes; the two are to be merged into one.)

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// NFKD, combining marks removed, lowercased, whitespace runs collapsed to one space, trimmed.
pub fn normalize_text(input: &str) -> String {
    let folded: String = input.nfkd().filter(|c| !is_combining_mark(*c)).flat_map(char::to_lowercase).collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The normalized words of a text: split on anything that is not a letter or a digit.
pub fn words(input: &str) -> Vec<String> {
    normalize_text(input).split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_accents_and_space() {
        assert_eq!(normalize_text("  Zoë   ÉLODIE\tMüller "), "zoe elodie muller");
        assert_eq!(normalize_text("ﬁne"), "fine");
        assert_eq!(normalize_text("Chalmers"), normalize_text("CHALMERS"));
    }

    #[test]
    fn splits_words_on_punctuation() {
        assert_eq!(words("van der Berg-Øster, Jr."), vec!["van", "der", "berg", "øster", "jr"]);
        assert!(words(" - ").is_empty());
    }
}
