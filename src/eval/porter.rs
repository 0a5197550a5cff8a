//! The Porter stemmer exactly as NLTK's `PorterStemmer()` applies it in its default
//! `NLTK_EXTENSIONS` mode — the stemmer `rouge_score` uses with `use_stemmer=True`.
//!
//! Words are ASCII lowercase here (Rouge tokens are `[a-z0-9]+`), so the code works on bytes.
//! Rules follow Porter (1980) with NLTK's departures: a pool of irregular forms, `ies`/`ied`
//! on four-letter words, `bli → ble`, `alli` handled recursively, `fulli` and `logi` rules, a
//! two-letter consonant–vowel–consonant extension, and a stricter `y → i` condition.

/// Irregular forms NLTK maps directly.
const IRREGULAR: &[(&str, &str)] = &[
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

fn is_vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// Consonant flags: `y` is a consonant at the start or after a vowel, a vowel after a
/// consonant.
fn consonant_flags(w: &[u8]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[u8], i: usize) -> bool {
    consonant_flags(&w[..=i])[i]
}

/// m: the number of vowel→consonant transitions.
fn measure(stem: &[u8]) -> usize {
    consonant_flags(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// `*o`: consonant–vowel–consonant with the last not w, x or y; NLTK also accepts a
/// two-letter vowel–consonant word.
fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

/// A rule's condition on the stem left after removing the suffix.
type Condition<'a> = &'a dyn Fn(&[u8]) -> bool;

/// The first rule whose suffix matches decides: its replacement if the condition holds,
/// otherwise the word unchanged.
fn apply_rules(w: Vec<u8>, rules: &[(&str, &str, Condition)]) -> Vec<u8> {
    for (suffix, replacement, cond) in rules {
        if w.ends_with(suffix.as_bytes()) {
            let stem = &w[..w.len() - suffix.len()];
            return if cond(stem) { [stem, replacement.as_bytes()].concat() } else { w };
        }
    }
    w
}

fn positive(stem: &[u8]) -> bool {
    measure(stem) > 0
}

fn step1a(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ies") && w.len() == 4 {
        return [&w[..1], b"ie"].concat();
    }
    let always: Condition = &|_| true;
    apply_rules(w, &[("sses", "ss", always), ("ies", "i", always), ("ss", "ss", always), ("s", "", always)])
}

fn step1b(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ied") {
        let stem = &w[..w.len() - 3];
        return [stem, if w.len() == 4 { b"ie".as_slice() } else { b"i".as_slice() }].concat();
    }
    if w.ends_with(b"eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 { [stem, b"ee"].concat() } else { w };
    }
    let mut stem = None;
    for suffix in [b"ed".as_slice(), b"ing".as_slice()] {
        if w.ends_with(suffix) {
            let s = &w[..w.len() - suffix.len()];
            if contains_vowel(s) {
                stem = Some(s.to_vec());
                break;
            }
        }
    }
    let Some(s) = stem else { return w };
    for (suffix, replacement) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if s.ends_with(suffix.as_bytes()) {
            return [&s[..s.len() - suffix.len()], replacement.as_bytes()].concat();
        }
    }
    if ends_double_consonant(&s) {
        let last = s[s.len() - 1];
        return if matches!(last, b'l' | b's' | b'z') { s } else { s[..s.len() - 1].to_vec() };
    }
    if measure(&s) == 1 && ends_cvc(&s) {
        return [s.as_slice(), b"e"].concat();
    }
    s
}

fn step1c(w: Vec<u8>) -> Vec<u8> {
    let cond: Condition = &|stem: &[u8]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[("y", "i", cond)])
}

fn step2(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"alli") && positive(&w[..w.len() - 4]) {
        return step2([&w[..w.len() - 4], b"al"].concat());
    }
    let word = w.clone();
    let logi: Condition = &|_| positive(&word[..word.len() - 3]);
    let p: Condition = &positive;
    apply_rules(
        w,
        &[
            ("ational", "ate", p),
            ("tional", "tion", p),
            ("enci", "ence", p),
            ("anci", "ance", p),
            ("izer", "ize", p),
            ("bli", "ble", p),
            ("alli", "al", p),
            ("entli", "ent", p),
            ("eli", "e", p),
            ("ousli", "ous", p),
            ("ization", "ize", p),
            ("ation", "ate", p),
            ("ator", "ate", p),
            ("alism", "al", p),
            ("iveness", "ive", p),
            ("fulness", "ful", p),
            ("ousness", "ous", p),
            ("aliti", "al", p),
            ("iviti", "ive", p),
            ("biliti", "ble", p),
            ("fulli", "ful", p),
            ("logi", "log", logi),
        ],
    )
}

fn step3(w: Vec<u8>) -> Vec<u8> {
    let p: Condition = &positive;
    apply_rules(
        w,
        &[
            ("icate", "ic", p),
            ("ative", "", p),
            ("alize", "al", p),
            ("iciti", "ic", p),
            ("ical", "ic", p),
            ("ful", "", p),
            ("ness", "", p),
        ],
    )
}

fn step4(w: Vec<u8>) -> Vec<u8> {
    let m1: Condition = &|s: &[u8]| measure(s) > 1;
    let ion: Condition = &|s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    apply_rules(
        w,
        &[
            ("al", "", m1),
            ("ance", "", m1),
            ("ence", "", m1),
            ("er", "", m1),
            ("ic", "", m1),
            ("able", "", m1),
            ("ible", "", m1),
            ("ant", "", m1),
            ("ement", "", m1),
            ("ment", "", m1),
            ("ent", "", m1),
            ("ion", "", ion),
            ("ou", "", m1),
            ("ism", "", m1),
            ("ate", "", m1),
            ("iti", "", m1),
            ("ous", "", m1),
            ("ive", "", m1),
            ("ize", "", m1),
        ],
    )
}

fn step5a(w: Vec<u8>) -> Vec<u8> {
    if let Some(stem) = w.strip_suffix(b"e") {
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ll") && measure(&w[..w.len() - 1]) > 1 {
        return w[..w.len() - 1].to_vec();
    }
    w
}

/// The stem of a lowercase ASCII word.
pub fn stem(word: &str) -> String {
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == word) {
        return s.to_string();
    }
    if word.len() <= 2 {
        return word.to_string();
    }
    let mut w = word.as_bytes().to_vec();
    for step in [step1a, step1b, step1c, step2, step3, step4, step5a, step5b] {
        w = step(w);
    }
    String::from_utf8(w).unwrap_or_else(|_| word.to_string())
}
