//! The demo's synthetic world: invented animals with checkable facts, the small English-like
//! language they are described in, and a checker that parses generated text back into
//! statements and says of each whether it is true in the world.
//!
//! Every animal has a colour, a habitat, a food, a size, a sound, one friend (friendship is
//! mutual) and one animal it is afraid of. Each kind of fact has several phrasings
//! ([`Template`]); descriptions, stories and lists put facts in any order and any phrasing, so
//! an instruction such as "describe the bazor ." has a great many correct answers (the
//! multi-modality the paper's argument is about), and a wrong colour or an animal that does
//! not exist is a countable error (its "more precise responses" claim, measured exactly).
//!
//! Everything is deterministic under a seed; names are drawn from a fixed pool, so one
//! word-level tokenizer covers every world.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

/// The pool of animal names: every first syllable with every second.
const FIRST: &[&str] =
    &["ba", "ko", "mi", "zu", "te", "ra", "lo", "fi", "pe", "su", "go", "ni", "da", "vu", "ye", "xo"];
const SECOND: &[&str] =
    &["lim", "rak", "dop", "nuz", "ster", "mel", "vok", "tin", "gar", "pul", "sek", "zor", "bin", "fap", "wex", "hul"];

/// The values of each attribute.
pub const COLOURS: &[&str] = &["red", "blue", "green", "yellow", "white", "black", "brown", "grey"];
/// Habitats.
pub const HABITATS: &[&str] = &["forest", "river", "desert", "mountain", "swamp", "cave", "meadow", "lake"];
/// Foods.
pub const FOODS: &[&str] = &["berries", "fish", "seeds", "leaves", "insects", "roots", "honey", "grass"];
/// Sizes.
pub const SIZES: &[&str] = &["tiny", "small", "large", "huge"];
/// Sounds (verbs: "the bazor hums .").
pub const SOUNDS: &[&str] = &["hums", "whistles", "growls", "chirps", "roars", "clicks", "hisses", "sings"];

/// The kinds of fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    /// Colour.
    Colour,
    /// Habitat.
    Habitat,
    /// Food.
    Food,
    /// Size.
    Size,
    /// Sound.
    Sound,
    /// The (mutual) friend.
    Friend,
    /// The animal it is afraid of.
    Enemy,
}

impl Relation {
    /// Every relation, in a fixed order.
    pub const ALL: [Relation; 7] = [
        Relation::Colour,
        Relation::Habitat,
        Relation::Food,
        Relation::Size,
        Relation::Sound,
        Relation::Friend,
        Relation::Enemy,
    ];
}

/// One animal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Animal {
    /// Its name (one word).
    pub name: String,
    /// Indices into [`COLOURS`], [`HABITATS`], [`FOODS`], [`SIZES`], [`SOUNDS`].
    pub colour: usize,
    /// Habitat index.
    pub habitat: usize,
    /// Food index.
    pub food: usize,
    /// Size index.
    pub size: usize,
    /// Sound index.
    pub sound: usize,
    /// Index of its friend.
    pub friend: usize,
    /// Index of the animal it is afraid of.
    pub enemy: usize,
}

/// A world: its animals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// The animals.
    pub animals: Vec<Animal>,
}

/// What a slot of a template holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// The subject animal.
    Subject,
    /// A second animal.
    Other,
    /// A value of a relation.
    Value(Relation),
}

/// A sentence with slots (`{S}` subject, `{O}` other animal, `{colour}` etc.) and the facts it
/// states: (relation, slot of the value or other animal).
#[derive(Clone, Debug)]
pub struct Template {
    words: Vec<Result<Slot, &'static str>>,
    facts: Vec<Relation>,
}

impl Template {
    fn new(text: &'static str, facts: &[Relation]) -> Self {
        let words = text
            .split_whitespace()
            .map(|w| match w {
                "{S}" => Ok(Slot::Subject),
                "{O}" => Ok(Slot::Other),
                "{colour}" => Ok(Slot::Value(Relation::Colour)),
                "{habitat}" => Ok(Slot::Value(Relation::Habitat)),
                "{food}" => Ok(Slot::Value(Relation::Food)),
                "{size}" => Ok(Slot::Value(Relation::Size)),
                "{sound}" => Ok(Slot::Value(Relation::Sound)),
                other => Err(other),
            })
            .collect();
        Self { words, facts: facts.to_vec() }
    }

    /// The literal words of the template.
    fn literals(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.words.iter().filter_map(|w| w.err())
    }
}

/// Phrasings of each single fact about `{S}`.
fn fact_templates(r: Relation) -> Vec<Template> {
    use Relation::*;
    let t = |s: &'static str| Template::new(s, &[r]);
    match r {
        Colour => vec![t("the {S} is {colour} ."), t("the {S} has {colour} fur ."), t("a {S} is always {colour} .")],
        Habitat => vec![
            t("the {S} lives in the {habitat} ."),
            t("you can find the {S} in the {habitat} ."),
            t("the {S} makes its home in the {habitat} ."),
        ],
        Food => {
            vec![t("the {S} eats {food} ."), t("the {S} feeds on {food} ."), t("{food} is what the {S} likes to eat .")]
        }
        Size => vec![t("the {S} is {size} ."), t("the {S} is a {size} animal .")],
        Sound => vec![t("the {S} {sound} ."), t("at night the {S} {sound} .")],
        Friend => vec![
            t("the {S} is a friend of the {O} ."),
            t("the {S} and the {O} are friends ."),
            t("the friend of the {S} is the {O} ."),
        ],
        Enemy => vec![
            t("the {S} is afraid of the {O} ."),
            t("the {S} runs away from the {O} ."),
            t("the {S} fears the {O} ."),
        ],
    }
}

/// Story sentences: (template, what it needs the subject/other to be). `{S}` is the story's
/// first animal and `{O}` the second unless the template says otherwise.
fn story_templates() -> Vec<Template> {
    use Relation::*;
    vec![
        Template::new("one day the {S} left the {habitat} .", &[Habitat]),
        Template::new("the {S} was looking for {food} .", &[Food]),
        Template::new("on the way the {S} met the {O} .", &[]),
        Template::new("the {S} went back to the {habitat} .", &[Habitat]),
        Template::new("the {S} {sound} loudly .", &[Sound]),
        Template::new("the {S} was happy to see the {O} .", &[Friend]),
        Template::new("the {S} hid from the {O} .", &[Enemy]),
        Template::new("the end .", &[]),
    ]
}

/// The words of the instructions and the prompt scaffold.
const INSTRUCTION_WORDS: &[&str] = &[
    "Instruction",
    "Response",
    ":",
    "?",
    "describe",
    "tell",
    "story",
    "about",
    "which",
    "animals",
    "live",
    "are",
    "eat",
    "what",
    "colour",
    "where",
    "does",
    "who",
    "is",
    "of",
    "the",
    "and",
    "its",
    "in",
    ",",
    ".",
    "no",
    "animal",
    "lives",
];

impl World {
    /// A world of `n` animals (at most 256) drawn with `rng`.
    pub fn generate(n: usize, rng: &mut impl Rng) -> Self {
        let mut names: Vec<String> = FIRST.iter().flat_map(|a| SECOND.iter().map(move |b| format!("{a}{b}"))).collect();
        names.shuffle(rng);
        names.truncate(n.clamp(4, FIRST.len() * SECOND.len()));
        let n = names.len();
        // Friendship is mutual: a random perfect matching (a leftover animal befriends a pair's
        // first member one-way, which the checker accepts in both directions).
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        let mut friend = vec![0; n];
        for pair in order.chunks(2) {
            match *pair {
                [a, b] => {
                    friend[a] = b;
                    friend[b] = a;
                }
                [a] => friend[a] = order[0],
                _ => {}
            }
        }
        let animals = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let enemy = loop {
                    let e = rng.random_range(0..n);
                    if e != i && e != friend[i] {
                        break e;
                    }
                };
                Animal {
                    name,
                    colour: rng.random_range(0..COLOURS.len()),
                    habitat: rng.random_range(0..HABITATS.len()),
                    food: rng.random_range(0..FOODS.len()),
                    size: rng.random_range(0..SIZES.len()),
                    sound: rng.random_range(0..SOUNDS.len()),
                    friend: friend[i],
                    enemy,
                }
            })
            .collect();
        Self { animals }
    }

    /// The world `world.json` describes (as [`super::tasks::write_dataset`] writes it).
    pub fn from_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        use anyhow::Context;
        let list = v["animals"].as_array().context("no `animals` list")?;
        let names: Vec<String> = list
            .iter()
            .map(|a| a["name"].as_str().map(str::to_string).context("an animal without a name"))
            .collect::<anyhow::Result<_>>()?;
        let index = |vals: &[&str], w: &str| vals.iter().position(|x| *x == w);
        let mut animals = Vec::with_capacity(list.len());
        for (a, name) in list.iter().zip(&names) {
            let fact = |k: &str| a["facts"][k].as_str().with_context(|| format!("{name}: no `{k}`"));
            let value = |k: &str, vals: &[&str]| -> anyhow::Result<usize> {
                let w = fact(k)?;
                index(vals, w).with_context(|| format!("{name}: unknown {k} `{w}`"))
            };
            let animal = |k: &str| -> anyhow::Result<usize> {
                let w = fact(k)?;
                names.iter().position(|n| n == w).with_context(|| format!("{name}: unknown {k} `{w}`"))
            };
            animals.push(Animal {
                name: name.clone(),
                colour: value("colour", COLOURS)?,
                habitat: value("habitat", HABITATS)?,
                food: value("food", FOODS)?,
                size: value("size", SIZES)?,
                sound: value("sound", SOUNDS)?,
                friend: animal("friend")?,
                enemy: animal("enemy")?,
            });
        }
        Ok(Self { animals })
    }

    /// The animal called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.animals.iter().position(|a| a.name == name)
    }

    /// The value word of relation `r` for animal `a` (an animal's name for friend and enemy).
    pub fn value(&self, a: usize, r: Relation) -> &str {
        let x = &self.animals[a];
        match r {
            Relation::Colour => COLOURS[x.colour],
            Relation::Habitat => HABITATS[x.habitat],
            Relation::Food => FOODS[x.food],
            Relation::Size => SIZES[x.size],
            Relation::Sound => SOUNDS[x.sound],
            Relation::Friend => &self.animals[x.friend].name,
            Relation::Enemy => &self.animals[x.enemy].name,
        }
    }

    /// Whether a statement is true: its animals exist and the fact holds.
    pub fn holds(&self, s: &Statement) -> bool {
        match s {
            Statement::Fact { subject, relation, object } => {
                let Some(a) = self.find(subject) else { return false };
                match relation {
                    Relation::Friend => {
                        self.find(object).is_some_and(|b| self.animals[a].friend == b || self.animals[b].friend == a)
                    }
                    Relation::Enemy => self.find(object).is_some_and(|b| self.animals[a].enemy == b),
                    r => self.value(a, *r) == object,
                }
            }
            Statement::Exists(name) => self.find(name).is_some(),
            Statement::NoneHas { relation, value } => {
                (0..self.animals.len()).all(|a| self.value(a, *relation) != value)
            }
        }
    }

    /// The animals whose `relation` is `value`.
    pub fn having(&self, relation: Relation, value: &str) -> Vec<usize> {
        (0..self.animals.len()).filter(|&a| self.value(a, relation) == value).collect()
    }

    /// One sentence stating fact `r` of animal `a`, in a random phrasing.
    pub fn fact_sentence(&self, a: usize, r: Relation, rng: &mut impl Rng) -> String {
        let ts = fact_templates(r);
        let t = ts.choose(rng).expect("every relation has phrasings");
        self.fill(t, a, self.other(a, r))
    }

    /// The animal a sentence about `r` names second (friend or enemy), else `a` itself.
    fn other(&self, a: usize, r: Relation) -> usize {
        match r {
            Relation::Friend => self.animals[a].friend,
            Relation::Enemy => self.animals[a].enemy,
            _ => a,
        }
    }

    fn fill(&self, t: &Template, subject: usize, other: usize) -> String {
        let words: Vec<&str> = t
            .words
            .iter()
            .map(|w| match w {
                Ok(Slot::Subject) => self.animals[subject].name.as_str(),
                Ok(Slot::Other) => self.animals[other].name.as_str(),
                Ok(Slot::Value(r)) => self.value(subject, *r),
                Err(word) => word,
            })
            .collect();
        words.join(" ")
    }

    /// All seven facts of animal `a`, in a random order and random phrasings.
    pub fn describe(&self, a: usize, rng: &mut impl Rng) -> String {
        let mut rels = Relation::ALL.to_vec();
        rels.shuffle(rng);
        rels.iter().map(|&r| self.fact_sentence(a, r, rng)).collect::<Vec<_>>().join(" ")
    }

    /// A short story about `a` and `b` (its friend or the animal it fears): they meet, and the
    /// story states the relation and several facts, in a random choice of sentences.
    pub fn story(&self, a: usize, b: usize, rng: &mut impl Rng) -> String {
        let st = story_templates();
        let friends = self.animals[a].friend == b || self.animals[b].friend == a;
        let mut middle: Vec<String> = vec![self.fill(&st[1], a, b)];
        if rng.random_bool(0.5) {
            middle.push(self.fill(&st[4], b, a));
        }
        if rng.random_bool(0.5) {
            middle.push(self.fact_sentence(b, Relation::Colour, rng));
        }
        if rng.random_bool(0.5) {
            middle.push(self.fact_sentence(a, Relation::Size, rng));
        }
        middle.shuffle(rng);
        let mut s = vec![self.fill(&st[0], a, b)];
        s.extend(middle);
        s.push(self.fill(&st[2], a, b));
        s.push(if friends { self.fill(&st[5], a, b) } else { self.fill(&st[6], a, b) });
        if rng.random_bool(0.5) {
            s.push(self.fill(&st[3], a, b));
        }
        s.push("the end .".into());
        s.join(" ")
    }

    /// The animals whose `relation` is `value`, as one list sentence in a random order (or the
    /// sentence saying there are none).
    pub fn list(&self, relation: Relation, value: &str, rng: &mut impl Rng) -> String {
        let mut xs = self.having(relation, value);
        xs.shuffle(rng);
        let predicate = match relation {
            Relation::Habitat => format!("live in the {value} ."),
            Relation::Colour => format!("are {value} ."),
            Relation::Food => format!("eat {value} ."),
            _ => unreachable!("lists are over habitat, colour or food"),
        };
        match xs.as_slice() {
            [] => match relation {
                Relation::Habitat => format!("no animal lives in the {value} ."),
                Relation::Colour => format!("no animal is {value} ."),
                _ => format!("no animal eats {value} ."),
            },
            [x] => self.fact_sentence(*x, relation, rng),
            _ => {
                let names: Vec<String> = xs.iter().map(|&x| format!("the {}", self.animals[x].name)).collect();
                let (last, rest) = names.split_last().expect("two or more");
                format!("{} and {last} {predicate}", rest.join(" , "))
            }
        }
    }
}

/// A claim a sentence makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    /// `subject` has `object` as its `relation` (a value word, or an animal's name).
    Fact {
        /// The animal the fact is about.
        subject: String,
        /// Which fact.
        relation: Relation,
        /// The value or the other animal.
        object: String,
    },
    /// The animal named exists (a sentence that only mentions it).
    Exists(String),
    /// No animal has this value.
    NoneHas {
        /// Which attribute.
        relation: Relation,
        /// The value.
        value: String,
    },
}

/// What the checker found in one response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Statements true in the world.
    pub true_statements: usize,
    /// Statements false in the world (wrong facts, animals that do not exist).
    pub false_statements: usize,
    /// Sentences that match no phrasing of the language.
    pub unparseable: usize,
    /// Sentences.
    pub sentences: usize,
}

impl Verdict {
    /// True statements over all statements (1 when there are none).
    pub fn precision(&self) -> f64 {
        let n = self.true_statements + self.false_statements;
        if n == 0 {
            1.0
        } else {
            self.true_statements as f64 / n as f64
        }
    }

    /// Adds another verdict's counts.
    pub fn add(&mut self, o: &Verdict) {
        self.true_statements += o.true_statements;
        self.false_statements += o.false_statements;
        self.unparseable += o.unparseable;
        self.sentences += o.sentences;
    }
}

/// Parses responses into statements and checks them against a world.
pub struct Checker<'a> {
    world: &'a World,
    templates: Vec<Template>,
    scaffold: std::collections::HashSet<&'static str>,
}

impl<'a> Checker<'a> {
    /// A checker for `world`.
    pub fn new(world: &'a World) -> Self {
        let mut templates: Vec<Template> = Relation::ALL.iter().flat_map(|&r| fact_templates(r)).collect();
        templates.extend(story_templates());
        let mut scaffold: std::collections::HashSet<&'static str> =
            templates.iter().flat_map(Template::literals).collect();
        scaffold.extend(INSTRUCTION_WORDS.iter().copied());
        for vals in [COLOURS, HABITATS, FOODS, SIZES, SOUNDS] {
            scaffold.extend(vals.iter().copied());
        }
        Self { world, templates, scaffold }
    }

    /// Checks every sentence of `text`.
    pub fn check(&self, text: &str) -> Verdict {
        let mut v = Verdict::default();
        for sentence in sentences(text) {
            v.sentences += 1;
            match self.parse(&sentence) {
                Some(statements) => {
                    for s in statements {
                        if self.world.holds(&s) {
                            v.true_statements += 1;
                        } else {
                            v.false_statements += 1;
                        }
                    }
                }
                None => v.unparseable += 1,
            }
        }
        v
    }

    /// The statements of one sentence (its words, ending in "."), or `None` when it matches no
    /// phrasing.
    pub fn parse(&self, words: &[&str]) -> Option<Vec<Statement>> {
        self.parse_template(words).or_else(|| self.parse_list(words))
    }

    /// A word that can name an animal: not a word of the language (so an invented name is
    /// recognised as a name, and then found not to exist).
    fn name_like(&self, w: &str) -> bool {
        !self.scaffold.contains(w) && w.chars().all(|c| c.is_ascii_lowercase())
    }

    fn parse_template(&self, words: &[&str]) -> Option<Vec<Statement>> {
        'templates: for t in &self.templates {
            if t.words.len() != words.len() {
                continue;
            }
            let (mut subject, mut other, mut values) = (None, None, Vec::new());
            for (slot, &w) in t.words.iter().zip(words) {
                match slot {
                    Err(lit) if *lit == w => {}
                    Err(_) => continue 'templates,
                    Ok(Slot::Subject) if self.name_like(w) => subject = Some(w),
                    Ok(Slot::Other) if self.name_like(w) => other = Some(w),
                    Ok(Slot::Value(r)) if values_of(*r).contains(&w) => values.push((*r, w)),
                    Ok(_) => continue 'templates,
                }
            }
            let Some(subject) = subject else {
                // A sentence naming no animal ("the end .") states nothing.
                return Some(Vec::new());
            };
            let mut out = Vec::new();
            for &r in &t.facts {
                let object = match r {
                    Relation::Friend | Relation::Enemy => other?,
                    _ => values.iter().find(|(vr, _)| *vr == r).map(|(_, w)| *w)?,
                };
                out.push(Statement::Fact { subject: subject.into(), relation: r, object: object.into() });
            }
            if t.facts.is_empty() {
                out.push(Statement::Exists(subject.into()));
                if let Some(o) = other {
                    out.push(Statement::Exists(o.into()));
                }
            } else if let (Some(o), false) =
                (other, t.facts.iter().any(|r| matches!(r, Relation::Friend | Relation::Enemy)))
            {
                out.push(Statement::Exists(o.into()));
            }
            return Some(out);
        }
        None
    }

    /// `the a , the b and the c live in the forest .` (also `are red .`, `eat fish .`), and
    /// `no animal lives in the forest .` (`is red`, `eats fish`).
    fn parse_list(&self, words: &[&str]) -> Option<Vec<Statement>> {
        let (&dot, body) = words.split_last()?;
        if dot != "." {
            return None;
        }
        let value_of =
            |relation: Relation, w: &str| values_of(relation).contains(&w).then(|| (relation, w.to_string()));
        if let ["no", "animal", rest @ ..] = body {
            let (relation, value) = match rest {
                ["lives", "in", "the", h] => value_of(Relation::Habitat, h)?,
                ["is", c] => value_of(Relation::Colour, c)?,
                ["eats", f] => value_of(Relation::Food, f)?,
                _ => return None,
            };
            return Some(vec![Statement::NoneHas { relation, value }]);
        }
        let (names, predicate) = match body {
            [names @ .., "live", "in", "the", h] => (names, value_of(Relation::Habitat, h)?),
            [names @ .., "are", c] => (names, value_of(Relation::Colour, c)?),
            [names @ .., "eat", f] => (names, value_of(Relation::Food, f)?),
            _ => return None,
        };
        // `the a , the b and the c`: names at every third word, separated by `,` and one `and`.
        let mut out = Vec::new();
        let mut i = 0;
        while i < names.len() {
            let (&the, &name) = (names.get(i)?, names.get(i + 1)?);
            if the != "the" || !self.name_like(name) {
                return None;
            }
            out.push(Statement::Fact { subject: name.into(), relation: predicate.0, object: predicate.1.clone() });
            i += 2;
            if i < names.len() {
                let sep = names[i];
                let last = i + 3 == names.len();
                if !((sep == "," && !last) || (sep == "and" && last)) {
                    return None;
                }
                i += 1;
            }
        }
        (out.len() >= 2).then_some(out)
    }
}

/// The values a non-animal relation takes.
pub fn values_of(r: Relation) -> &'static [&'static str] {
    match r {
        Relation::Colour => COLOURS,
        Relation::Habitat => HABITATS,
        Relation::Food => FOODS,
        Relation::Size => SIZES,
        Relation::Sound => SOUNDS,
        Relation::Friend | Relation::Enemy => &[],
    }
}

/// The sentences of a response: its words, cut after every ".", a trailing fragment included.
pub fn sentences(text: &str) -> Vec<Vec<&str>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for w in text.split_whitespace() {
        cur.push(w);
        if w == "." {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Every word the world's texts and instructions can contain, in a fixed order: the
/// vocabulary of the demo's word-level tokenizer.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        if !words.iter().any(|x| x == w) {
            words.push(w.to_string());
        }
    };
    INSTRUCTION_WORDS.iter().for_each(|w| push(w));
    let templates = Relation::ALL.iter().flat_map(|&r| fact_templates(r)).chain(story_templates());
    for t in templates {
        t.literals().for_each(&mut push);
    }
    for vals in [COLOURS, HABITATS, FOODS, SIZES, SOUNDS] {
        vals.iter().for_each(|w| push(w));
    }
    for a in FIRST {
        for b in SECOND {
            push(&format!("{a}{b}"));
        }
    }
    words
}
