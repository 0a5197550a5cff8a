//! The demo's data over a [`World`]: instruction tasks (long multi-answer descriptions,
//! stories and lists, short single-answer questions, and two task families held out of
//! training), the pre-training corpus (encyclopedia paragraphs and stories), the splits, and
//! the word-level tokenizer.
//!
//! Every distinct instruction belongs to exactly one split (train, validation or test), chosen
//! by a hash of its text, so no test prompt is ever trained on; the facts behind a test prompt
//! are learnt from the corpus and the other tasks. Training examples repeat an instruction
//! with independently drawn answers (another order, other phrasings); validation and test
//! records carry several answers as references (Rouge-L takes the best match).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, Result};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::AddedToken;

use super::world::{vocabulary, Relation, World, COLOURS, FOODS, HABITATS};
use crate::tokenizer::Tokenizer;

/// End of sequence (also the padding id): id 0 of the demo's tokenizer.
pub const EOS_TOKEN: &str = "<|endoftext|>";
const UNK_TOKEN: &str = "<unk>";

/// References kept per validation and test instruction of a multi-answer family.
pub const REFERENCES: usize = 8;

/// The task families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `describe the bazor .` → all seven facts, any order and phrasing (~45 words).
    Describe,
    /// `tell a story about the bazor and the kolim .` → a story stating their relation and
    /// several facts (~40 words).
    Story,
    /// `which animals live in the forest ?` → every such animal, any order.
    ListHabitat,
    /// `which animals are red ?`.
    ListColour,
    /// `what colour is the bazor ?` → `the bazor is red .` (one answer).
    AskColour,
    /// `where does the bazor live ?` → `the bazor lives in the forest .` (one answer).
    AskHabitat,
    /// `who is the friend of the bazor ?` → `the friend of the bazor is the kolim .`.
    AskFriend,
    /// Held out: `which animals eat fish ?` (the list form over another fact).
    ListFood,
    /// Held out: `describe the friend of the bazor .` (two hops).
    DescribeFriend,
}

impl Family {
    /// Families trained on (and tested in distribution).
    pub const TRAINED: [Family; 7] = [
        Family::Describe,
        Family::Story,
        Family::ListHabitat,
        Family::ListColour,
        Family::AskColour,
        Family::AskHabitat,
        Family::AskFriend,
    ];
    /// Families never trained on (the out-of-distribution test set).
    pub const HELD_OUT: [Family; 2] = [Family::ListFood, Family::DescribeFriend];
    /// Every family.
    pub const ALL: [Family; 9] = [
        Family::Describe,
        Family::Story,
        Family::ListHabitat,
        Family::ListColour,
        Family::AskColour,
        Family::AskHabitat,
        Family::AskFriend,
        Family::ListFood,
        Family::DescribeFriend,
    ];

    /// The name written into the data files.
    pub fn name(self) -> &'static str {
        match self {
            Family::Describe => "describe",
            Family::Story => "story",
            Family::ListHabitat => "list_habitat",
            Family::ListColour => "list_colour",
            Family::AskColour => "ask_colour",
            Family::AskHabitat => "ask_habitat",
            Family::AskFriend => "ask_friend",
            Family::ListFood => "list_food",
            Family::DescribeFriend => "describe_friend",
        }
    }

    /// The family of a name written by [`Family::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether instructions of the family have many right answers.
    pub fn is_multi_answer(self) -> bool {
        !matches!(self, Family::AskColour | Family::AskHabitat | Family::AskFriend)
    }
}

/// One instruction of a family: its text and how to draw an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The family.
    pub family: Family,
    /// The instruction text.
    pub instruction: String,
    /// The animal(s) or value it is about.
    subject: Subject,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Subject {
    Animal(usize),
    Pair(usize, usize),
    Value(Relation, &'static str),
}

impl Task {
    /// Every instruction of `family` in `world`.
    pub fn all(world: &World, family: Family) -> Vec<Task> {
        let n = world.animals.len();
        let name = |a: usize| world.animals[a].name.clone();
        let task = |instruction: String, subject| Task { family, instruction, subject };
        match family {
            Family::Describe => {
                (0..n).map(|a| task(format!("describe the {} .", name(a)), Subject::Animal(a))).collect()
            }
            Family::Story => (0..n)
                .flat_map(|a| [world.animals[a].friend, world.animals[a].enemy].map(|b| (a, b)))
                .map(|(a, b)| {
                    task(format!("tell a story about the {} and the {} .", name(a), name(b)), Subject::Pair(a, b))
                })
                .collect(),
            Family::ListHabitat => values(HABITATS, Relation::Habitat, "which animals live in the {} ?", family),
            Family::ListColour => values(COLOURS, Relation::Colour, "which animals are {} ?", family),
            Family::ListFood => values(FOODS, Relation::Food, "which animals eat {} ?", family),
            Family::AskColour => {
                (0..n).map(|a| task(format!("what colour is the {} ?", name(a)), Subject::Animal(a))).collect()
            }
            Family::AskHabitat => {
                (0..n).map(|a| task(format!("where does the {} live ?", name(a)), Subject::Animal(a))).collect()
            }
            Family::AskFriend => {
                (0..n).map(|a| task(format!("who is the friend of the {} ?", name(a)), Subject::Animal(a))).collect()
            }
            Family::DescribeFriend => {
                (0..n).map(|a| task(format!("describe the friend of the {} .", name(a)), Subject::Animal(a))).collect()
            }
        }
    }

    /// One right answer, drawn with `rng` (another order and other phrasings each time for the
    /// multi-answer families).
    pub fn answer(&self, world: &World, rng: &mut impl Rng) -> String {
        let name = |a: usize| world.animals[a].name.as_str();
        match (&self.family, &self.subject) {
            (Family::Describe, Subject::Animal(a)) => world.describe(*a, rng),
            (Family::Story, Subject::Pair(a, b)) => world.story(*a, *b, rng),
            (_, Subject::Value(r, v)) => world.list(*r, v, rng),
            (Family::AskColour, Subject::Animal(a)) => {
                format!("the {} is {} .", name(*a), world.value(*a, Relation::Colour))
            }
            (Family::AskHabitat, Subject::Animal(a)) => {
                format!("the {} lives in the {} .", name(*a), world.value(*a, Relation::Habitat))
            }
            (Family::AskFriend, Subject::Animal(a)) => {
                format!("the friend of the {} is the {} .", name(*a), world.value(*a, Relation::Friend))
            }
            (Family::DescribeFriend, Subject::Animal(a)) => {
                let b = world.animals[*a].friend;
                format!("the friend of the {} is the {} . {}", name(*a), name(b), world.describe(b, rng))
            }
            _ => unreachable!("every family is built with its kind of subject"),
        }
    }

    /// Up to `k` distinct answers (every answer of a single-answer family is the same).
    pub fn references(&self, world: &World, k: usize, rng: &mut impl Rng) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for _ in 0..k * 4 {
            let a = self.answer(world, rng);
            if seen.insert(a.clone()) {
                out.push(a);
            }
            if out.len() == k || !self.family.is_multi_answer() {
                break;
            }
        }
        out
    }
}

fn values(vals: &'static [&'static str], r: Relation, pattern: &str, family: Family) -> Vec<Task> {
    vals.iter()
        .map(|&v| Task { family, instruction: pattern.replace("{}", v), subject: Subject::Value(r, v) })
        .collect()
}

/// The prompt the models see for an instruction.
pub fn prompt(instruction: &str) -> String {
    format!("Instruction : {instruction}\nResponse :\n")
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

/// The size of a world and its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Animals in the world.
    pub animals: usize,
    /// Training examples (instructions repeat, with fresh answers).
    pub train: usize,
    /// Pre-training documents.
    pub corpus_docs: usize,
    /// Documents of the pre-training validation text.
    pub corpus_valid_docs: usize,
}

/// A pre-training document: an encyclopedia paragraph about one animal, a story about it and
/// its friend or the animal it fears, and a paragraph about another animal (~130 words).
pub fn document(world: &World, rng: &mut impl Rng) -> String {
    let n = world.animals.len();
    let a = rng.random_range(0..n);
    let b = if rng.random_bool(0.5) { world.animals[a].friend } else { world.animals[a].enemy };
    let c = rng.random_range(0..n);
    [world.describe(a, rng), world.story(a, b, rng), world.describe(c, rng)].join(" ")
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The world the data describes.
    pub world: World,
    /// Instructions per split: train, valid, test (trained families) and held out.
    pub counts: [usize; 4],
}

/// Writes the world (`world.json`), `train.jsonl`, `valid.jsonl`, `test.jsonl` (trained
/// families, distinct instructions never trained on), `held_out.jsonl` (held-out families),
/// `corpus.txt` and `corpus_valid.txt` (one document per line) and `tokenizer.json` into
/// `dir`; returns the world.
pub fn write_dataset(dir: &Path, sizes: &Sizes, seed: u64) -> Result<Dataset> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let world = World::generate(sizes.animals, &mut rng);
    let by_split = |split: Split| -> Vec<Vec<Task>> {
        Family::TRAINED
            .iter()
            .map(|&f| Task::all(&world, f).into_iter().filter(|t| split_of(&t.instruction) == split).collect())
            .collect()
    };
    let train_pools = by_split(Split::Train);
    // Every trained family gets the same share of training examples, cycling through its
    // instructions with a fresh answer each time.
    let pools: Vec<&Vec<Task>> = train_pools.iter().filter(|p| !p.is_empty()).collect();
    let mut train = Vec::with_capacity(sizes.train);
    for i in 0..sizes.train {
        let pool = pools[i % pools.len()];
        let t = pool.choose(&mut rng).expect("non-empty pool");
        let answer = t.answer(&world, &mut rng);
        train.push(json!({"prompt": prompt(&t.instruction), "output": answer, "family": t.family.name()}));
    }
    let mut record = |t: &Task| {
        let refs = t.references(&world, REFERENCES, &mut rng);
        json!({"prompt": prompt(&t.instruction), "output": refs, "family": t.family.name()})
    };
    let valid: Vec<_> = by_split(Split::Valid).iter().flatten().map(&mut record).collect();
    let test: Vec<_> = by_split(Split::Test).iter().flatten().map(&mut record).collect();
    let held: Vec<_> = Family::HELD_OUT.iter().flat_map(|&f| Task::all(&world, f)).map(|t| record(&t)).collect();
    let counts = [train.len(), valid.len(), test.len(), held.len()];
    let write = |name: &str, text: String| crate::atomic::write_file(&dir.join(name), text.as_bytes());
    let jsonl = |rows: Vec<serde_json::Value>| rows.into_iter().map(|r| format!("{r}\n")).collect::<String>();
    write("train.jsonl", jsonl(train))?;
    write("valid.jsonl", jsonl(valid))?;
    write("test.jsonl", jsonl(test))?;
    write("held_out.jsonl", jsonl(held))?;
    let docs = |n: usize, rng: &mut ChaCha8Rng| (0..n).map(|_| document(&world, rng) + "\n").collect::<String>();
    write("corpus.txt", docs(sizes.corpus_docs, &mut rng))?;
    write("corpus_valid.txt", docs(sizes.corpus_valid_docs, &mut rng))?;
    write("world.json", serde_json::to_string_pretty(&world_json(&world))?)?;
    tokenizer()?.save(&dir.join("tokenizer.json"))?;
    Ok(Dataset { world, counts })
}

fn world_json(world: &World) -> serde_json::Value {
    let animals: Vec<_> = world
        .animals
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let facts: serde_json::Map<String, serde_json::Value> =
                Relation::ALL.iter().map(|&r| (format!("{r:?}").to_lowercase(), json!(world.value(i, r)))).collect();
            json!({"name": a.name, "facts": facts})
        })
        .collect();
    json!({"animals": animals})
}

/// The word-level tokenizer of the demo: `<|endoftext|>` (id 0), `<unk>` (id 1), then every
/// word of the world's language; words are split on whitespace and punctuation and decoded
/// joined by spaces.
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
