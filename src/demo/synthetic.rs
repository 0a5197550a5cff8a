//! The demo's built-in instruction task: deterministic under a seed, nothing to download.
//!
//! It is built so that the paper's argument can show. Four task families have exactly one
//! right answer (copy, reverse or sort a short list; add two digits); three have several
//! (name two animals with a property, write a sentence about an animal using an adjective,
//! name an example of a kind), so a teacher trained on uniformly chosen answers is
//! multi-modal, and the facts behind them (which animal can fly, swim, …) are too many for
//! a small student to hold. Two further families are held out of training altogether and
//! make the out-of-distribution test set: name *three* animals, and a sentence using *two*
//! adjectives. They reuse what the training families teach, in a combination never seen.
//!
//! Every distinct instruction belongs to exactly one split (train, validation or test), chosen
//! by a hash of its text, so no test prompt is ever trained on. Training examples repeat an
//! instruction with independently drawn answers; validation and test records carry every
//! valid answer as references (Rouge-L takes the best match).
//!
//! The tokenizer is word-level over a fixed vocabulary (every word the generator can write),
//! built with the `tokenizers` crate and saved as an ordinary `tokenizer.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::AddedToken;

use crate::tokenizer::Tokenizer;

/// End of sequence (also the padding id): id 0 of the built-in tokenizer.
pub const EOS_TOKEN: &str = "<|endoftext|>";
const UNK_TOKEN: &str = "<unk>";

/// Animal properties and the animals that have them (six each; some animals have several).
const PROPERTIES: &[(&str, [&str; 6])] = &[
    ("can fly", ["owl", "bat", "bee", "crow", "hawk", "duck"]),
    ("can swim", ["fish", "seal", "eel", "duck", "frog", "otter"]),
    ("live on a farm", ["cow", "pig", "hen", "goat", "sheep", "horse"]),
    ("live in the forest", ["fox", "bear", "deer", "wolf", "owl", "boar"]),
    ("eat grass", ["cow", "goat", "sheep", "horse", "deer", "rabbit"]),
    ("have shells", ["snail", "crab", "turtle", "clam", "shrimp", "oyster"]),
    ("hunt at night", ["owl", "bat", "fox", "wolf", "cat", "moth"]),
    ("are very small", ["ant", "bee", "flea", "moth", "gnat", "mite"]),
];

/// Kinds of things and their examples.
const KINDS: &[(&str, [&str; 6])] = &[
    ("fruit", ["apple", "pear", "plum", "grape", "lemon", "mango"]),
    ("color", ["red", "blue", "green", "yellow", "black", "white"]),
    ("tool", ["hammer", "saw", "drill", "wrench", "shovel", "rake"]),
    ("vegetable", ["carrot", "onion", "potato", "pea", "bean", "leek"]),
    ("drink", ["water", "milk", "tea", "coffee", "juice", "soda"]),
    ("metal", ["iron", "gold", "silver", "copper", "tin", "lead"]),
    ("tree", ["oak", "pine", "elm", "birch", "maple", "ash"]),
    ("flower", ["rose", "tulip", "lily", "daisy", "iris", "poppy"]),
];

const NAME_VERBS: &[&str] = &["name", "list", "give", "mention", "suggest"];
const EXAMPLE_PHRASES: &[&str] =
    &["name a", "give an example of a", "what is an example of a", "mention a", "suggest a"];
const NOUNS: &[&str] = &["cat", "dog", "fox", "owl", "cow", "pig", "hen", "bee", "duck", "frog", "seal", "wolf"];
const ADJECTIVES: &[&str] = &["red", "blue", "green", "big", "small", "old", "young", "happy"];
/// Sentence templates: `{a}` is the adjective phrase, `{n}` the noun.
const SENTENCES: &[&str] =
    &["the {a} {n} is here .", "i saw a {a} {n} today .", "look at that {a} {n} .", "my {n} is very {a} ."];
const LETTERS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
/// Words of the prompt scaffolding and task phrasings.
const SCAFFOLD: &[&str] = &[
    "Instruction",
    "Response",
    ":",
    ",",
    ".",
    "copy",
    "reverse",
    "sort",
    "add",
    "and",
    "plus",
    "is",
    "what",
    "two",
    "three",
    "animals",
    "that",
    "a",
    "an",
    "example",
    "of",
    "write",
    "sentence",
    "about",
    "the",
    "using",
    "word",
    "words",
];

/// The task families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `copy : a b c` → `a b c`.
    Copy,
    /// `reverse : a b c` → `c b a`.
    Reverse,
    /// `sort : 7 2 9` → `2 7 9`.
    Sort,
    /// `add 3 and 5` → `3 plus 5 is 8`.
    Add,
    /// `name two animals that can fly` → `owl and bat can fly .` (30 answers).
    NameTwo,
    /// `write a sentence about the cat using the word red` → 4 answers.
    Sentence,
    /// `name a fruit` → `apple is a fruit .` (6 answers).
    Example,
    /// Held out: `name three animals that can fly` (120 answers).
    NameThree,
    /// Held out: a sentence using two adjectives (8 answers).
    SentenceTwo,
}

impl Family {
    /// The families trained on (and in the in-distribution test set).
    pub const TRAINED: [Family; 7] =
        [Family::Copy, Family::Reverse, Family::Sort, Family::Add, Family::NameTwo, Family::Sentence, Family::Example];
    /// The held-out families (the out-of-distribution test set).
    pub const HELD_OUT: [Family; 2] = [Family::NameThree, Family::SentenceTwo];
    /// Every family.
    pub const ALL: [Family; 9] = [
        Family::Copy,
        Family::Reverse,
        Family::Sort,
        Family::Add,
        Family::NameTwo,
        Family::Sentence,
        Family::Example,
        Family::NameThree,
        Family::SentenceTwo,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Family::Copy => "copy",
            Family::Reverse => "reverse",
            Family::Sort => "sort",
            Family::Add => "add",
            Family::NameTwo => "name-two",
            Family::Sentence => "sentence",
            Family::Example => "example",
            Family::NameThree => "name-three",
            Family::SentenceTwo => "sentence-two",
        }
    }

    /// Whether more than one answer is right.
    pub fn is_multi_answer(self) -> bool {
        !matches!(self, Family::Copy | Family::Reverse | Family::Sort | Family::Add)
    }
}

/// One instruction with every valid answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The family it belongs to.
    pub family: Family,
    /// Instruction text.
    pub instruction: String,
    /// Every valid answer (one for single-answer families).
    pub answers: Vec<String>,
}

/// The prompt the models see for an instruction.
pub fn prompt(instruction: &str) -> String {
    format!("Instruction : {instruction}\nResponse :\n")
}

fn ordered_picks(items: &[&str], k: usize) -> Vec<Vec<String>> {
    if k == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for (i, x) in items.iter().enumerate() {
        let rest: Vec<&str> = items.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, y)| *y).collect();
        for mut tail in ordered_picks(&rest, k - 1) {
            tail.insert(0, x.to_string());
            out.push(tail);
        }
    }
    out
}

fn sentence(template: &str, adjective: &str, noun: &str) -> String {
    template.replace("{a}", adjective).replace("{n}", noun)
}

/// Draws one task of `family`.
pub fn draw(family: Family, rng: &mut impl Rng) -> Task {
    let list = |rng: &mut dyn rand::RngCore, pool: &[&str]| -> Vec<String> {
        let n = rng.random_range(3..=7);
        (0..n).map(|_| pool.choose(rng).map_or_else(String::new, |s| s.to_string())).collect()
    };
    let (instruction, answers) = match family {
        Family::Copy | Family::Reverse => {
            let items = list(rng, LETTERS);
            let mut out = items.clone();
            if family == Family::Reverse {
                out.reverse();
            }
            (format!("{} : {}", family.name(), items.join(" ")), vec![out.join(" ")])
        }
        Family::Sort => {
            let n = rng.random_range(3..=6);
            let items: Vec<u32> = (0..n).map(|_| rng.random_range(0..20)).collect();
            let mut sorted = items.clone();
            sorted.sort_unstable();
            let show = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            (format!("sort : {}", show(&items)), vec![show(&sorted)])
        }
        Family::Add => {
            let (a, b) = (rng.random_range(0..10u32), rng.random_range(0..10u32));
            let text = if rng.random_bool(0.5) { format!("add {a} and {b}") } else { format!("what is {a} plus {b}") };
            (text, vec![format!("{a} plus {b} is {}", a + b)])
        }
        Family::NameTwo | Family::NameThree => {
            let (property, animals) = PROPERTIES.choose(rng).expect("non-empty table");
            let verb = NAME_VERBS.choose(rng).expect("non-empty table");
            let k = if family == Family::NameTwo { 2 } else { 3 };
            let count = if k == 2 { "two" } else { "three" };
            let answers = ordered_picks(animals, k)
                .into_iter()
                .map(|p| match p.as_slice() {
                    [a, b] => format!("{a} and {b} {property} ."),
                    [a, b, c] => format!("{a} , {b} and {c} {property} ."),
                    _ => unreachable!("k is 2 or 3"),
                })
                .collect();
            (format!("{verb} {count} animals that {property}"), answers)
        }
        Family::Sentence => {
            let (n, a) = (NOUNS.choose(rng).expect("non-empty"), ADJECTIVES.choose(rng).expect("non-empty"));
            let answers = SENTENCES.iter().map(|t| sentence(t, a, n)).collect();
            (format!("write a sentence about the {n} using the word {a}"), answers)
        }
        Family::SentenceTwo => {
            let n = NOUNS.choose(rng).expect("non-empty");
            let pair: Vec<&str> = ADJECTIVES.choose_multiple(rng, 2).copied().collect();
            let mut answers = Vec::new();
            for (x, y) in [(pair[0], pair[1]), (pair[1], pair[0])] {
                answers.extend(SENTENCES.iter().map(|t| sentence(t, &format!("{x} and {y}"), n)));
            }
            (format!("write a sentence about the {n} using the words {} and {}", pair[0], pair[1]), answers)
        }
        Family::Example => {
            let (kind, examples) = KINDS.choose(rng).expect("non-empty table");
            let phrase = EXAMPLE_PHRASES.choose(rng).expect("non-empty table");
            (format!("{phrase} {kind}"), examples.iter().map(|x| format!("{x} is a {kind} .")).collect())
        }
    };
    Task { family, instruction, answers }
}

/// Which split an instruction belongs to, from a hash of its text (FNV-1a): stable across
/// runs, seeds and sizes, so train, validation and test never share an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// 70% of instructions.
    Train,
    /// 10%.
    Valid,
    /// 20%.
    Test,
}

/// The split of an instruction.
pub fn split_of(instruction: &str) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instruction.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    match h % 10 {
        0..=6 => Split::Train,
        7 => Split::Valid,
        _ => Split::Test,
    }
}

/// How many examples of each kind to write.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Training examples (instructions repeat, with fresh answers).
    pub train: usize,
    /// Distinct validation instructions.
    pub valid: usize,
    /// Distinct in-distribution test instructions.
    pub test: usize,
    /// Distinct held-out-family test instructions.
    pub held_out: usize,
    /// Documents of the plain-text corpus.
    pub corpus_docs: usize,
}

/// Distinct tasks of `families` in `split`, drawn round-robin over the families until `n` are
/// found (a family whose pool runs dry, 2,000 draws without a new fitting instruction, is
/// skipped from then on).
fn distinct_tasks(families: &[Family], split: Option<Split>, n: usize, rng: &mut ChaCha8Rng) -> Vec<Task> {
    const MAX_MISSES: usize = 2000;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut misses = vec![0usize; families.len()];
    while out.len() < n && misses.iter().any(|&m| m <= MAX_MISSES) {
        for (k, &f) in families.iter().enumerate() {
            if out.len() >= n {
                break;
            }
            while misses[k] <= MAX_MISSES {
                let t = draw(f, rng);
                let fits = split.is_none_or(|s| split_of(&t.instruction) == s);
                if fits && seen.insert(t.instruction.clone()) {
                    out.push(t);
                    break;
                }
                misses[k] += 1;
            }
        }
    }
    out
}

/// A record with the sampled answer first (`output[0]` is what losses train on).
fn record(task: &Task, rng: &mut ChaCha8Rng, all_answers: bool) -> serde_json::Value {
    let mut answers = task.answers.clone();
    answers.shuffle(rng);
    let output = if all_answers { json!(answers) } else { json!(answers[0]) };
    json!({"prompt": prompt(&task.instruction), "output": output, "family": task.family.name()})
}

fn jsonl(rows: impl IntoIterator<Item = serde_json::Value>) -> String {
    rows.into_iter().map(|r| format!("{r}\n")).collect()
}

/// One plain-text document: statements of the facts behind the tasks.
fn document(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(6..=12);
    let mut s: Vec<String> = Vec::new();
    for _ in 0..n {
        let line = match rng.random_range(0..4) {
            0 => {
                let (p, animals) = PROPERTIES.choose(rng).expect("non-empty");
                format!("the {} and the {} {p} .", animals.choose(rng).expect("x"), animals.choose(rng).expect("x"))
            }
            1 => {
                let (kind, xs) = KINDS.choose(rng).expect("non-empty");
                format!("{} is a {kind} .", xs.choose(rng).expect("x"))
            }
            2 => {
                let t = SENTENCES.choose(rng).expect("non-empty");
                sentence(t, ADJECTIVES.choose(rng).expect("x"), NOUNS.choose(rng).expect("x"))
            }
            _ => {
                let (a, b) = (rng.random_range(0..10u32), rng.random_range(0..10u32));
                format!("{a} plus {b} is {} .", a + b)
            }
        };
        s.push(line);
    }
    s.join(" ")
}

/// Writes `train.jsonl`, `valid.jsonl`, `test.jsonl` (in distribution), `held_out.jsonl`
/// (held-out families), `corpus.txt` and `tokenizer.json` into `dir`.
pub fn write_dataset(dir: &Path, sizes: &Sizes, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let trained = Family::TRAINED;
    // Training: every family gets the same share of examples (families cycle), drawn from that
    // family's pool of distinct training instructions with fresh answers each time, so the few
    // instructions of a multi-answer family appear many times with different answers.
    let per_family = sizes.train.div_ceil(trained.len());
    let pools: Vec<Vec<Task>> =
        trained.iter().map(|&f| distinct_tasks(&[f], Some(Split::Train), per_family, &mut rng)).collect();
    let train: Vec<_> = (0..sizes.train)
        .map(|i| {
            let (pool, k) = (&pools[i % pools.len()], i / pools.len());
            let t = if k < pool.len() { &pool[k] } else { pool.choose(&mut rng).expect("non-empty pool") };
            record(t, &mut rng, false)
        })
        .collect();
    let valid = distinct_tasks(&trained, Some(Split::Valid), sizes.valid, &mut rng);
    let test = distinct_tasks(&trained, Some(Split::Test), sizes.test, &mut rng);
    let held_out = distinct_tasks(&Family::HELD_OUT, None, sizes.held_out, &mut rng);
    let atomic = |name: &str, text: String| crate::atomic::write_file(&dir.join(name), text.as_bytes());
    atomic("train.jsonl", jsonl(train))?;
    atomic("valid.jsonl", jsonl(valid.iter().map(|t| record(t, &mut rng, true)).collect::<Vec<_>>()))?;
    atomic("test.jsonl", jsonl(test.iter().map(|t| record(t, &mut rng, true)).collect::<Vec<_>>()))?;
    atomic("held_out.jsonl", jsonl(held_out.iter().map(|t| record(t, &mut rng, true)).collect::<Vec<_>>()))?;
    let corpus: String = (0..sizes.corpus_docs).map(|_| document(&mut rng) + "\n").collect();
    atomic("corpus.txt", corpus)?;
    tokenizer()?.save(&dir.join("tokenizer.json"))
}

/// Every word the generator can write, in a fixed order.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        if !words.iter().any(|x| x == w) {
            words.push(w.to_string());
        }
    };
    SCAFFOLD.iter().chain(NAME_VERBS).chain(LETTERS).chain(NOUNS).chain(ADJECTIVES).for_each(|w| push(w));
    let phrases =
        PROPERTIES.iter().map(|(p, _)| *p).chain(EXAMPLE_PHRASES.iter().copied()).chain(SENTENCES.iter().copied());
    for p in phrases {
        p.split_whitespace().filter(|w| !w.starts_with('{')).for_each(&mut push);
    }
    for (_, xs) in PROPERTIES {
        xs.iter().for_each(|w| push(w));
    }
    for (k, xs) in KINDS {
        push(k);
        xs.iter().for_each(|w| push(w));
    }
    for n in 0..20 {
        push(&n.to_string());
    }
    words
}

/// The word-level tokenizer of the task: `<|endoftext|>` (id 0), `<unk>` (id 1), then the
/// vocabulary; words are split on whitespace and punctuation and decoded joined by spaces.
pub fn tokenizer() -> Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, w) in [EOS_TOKEN, UNK_TOKEN].into_iter().map(str::to_string).chain(vocabulary()).enumerate() {
        vocab.insert(w, i as u32);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(UNK_TOKEN.into())
        .build()
        .map_err(|e| anyhow!("building the word-level tokenizer: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Whitespace {}));
    inner
        .add_special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .map_err(|e| anyhow!("adding {EOS_TOKEN}: {e}"))?;
    Ok(Tokenizer::from_inner(inner))
}
