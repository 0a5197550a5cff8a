//! The demo's world and data: every reference the generator writes passes the checker with
//! precision 1; corrupted references (a swapped attribute, a made-up animal, a wrong friend, a
//! wrong list) are caught; splits never share an instruction; every text is in the tokenizer's
//! vocabulary; generation is deterministic under the seed.

use std::collections::BTreeSet;

use minillm::data::jsonl::read_jsonl;
use minillm::demo::tasks::{self, split_of, Family, Sizes, Split, Task};
use minillm::demo::world::{Checker, Relation, Statement, World, COLOURS, HABITATS};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn sizes() -> Sizes {
    Sizes { animals: 40, train: 1500, corpus_docs: 60, corpus_valid_docs: 8 }
}

fn rows(path: &std::path::Path) -> Vec<Value> {
    read_jsonl(path).unwrap().into_iter().map(|(_, r)| r.unwrap()).collect()
}

fn instruction(row: &Value) -> String {
    let p = row["prompt"].as_str().unwrap();
    p.trim_start_matches("Instruction : ").trim_end_matches("\nResponse :\n").to_string()
}

fn outputs(row: &Value) -> Vec<String> {
    match &row["output"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        _ => panic!("bad output"),
    }
}

#[test]
fn every_reference_and_document_is_true_parseable_and_in_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tasks::write_dataset(tmp.path(), &sizes(), 7).unwrap();
    let world = World::from_json(
        &serde_json::from_str(&std::fs::read_to_string(tmp.path().join("world.json")).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(world, data.world, "world.json describes the world");
    let checker = Checker::new(&world);
    let tok = minillm::tokenizer::Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    let unk = tok.token_to_id("<unk>").unwrap();
    assert_eq!(tok.token_to_id(tasks::EOS_TOKEN), Some(0));
    let mut statements = 0;
    let mut long = 0;
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl", "held_out.jsonl"] {
        for r in rows(&tmp.path().join(file)) {
            for out in outputs(&r) {
                let v = checker.check(&out);
                assert_eq!((v.false_statements, v.unparseable), (0, 0), "{file}: {out}");
                assert!(v.true_statements > 0, "{file}: no statement in {out}");
                statements += v.true_statements;
                let ids = tok.encode(&format!("{}{out}", r["prompt"].as_str().unwrap())).unwrap();
                assert!(!ids.contains(&unk), "unknown word in {out}");
                long += usize::from(out.split_whitespace().count() >= 20);
            }
        }
    }
    assert!(statements > 10_000 && long > 1000, "{statements} statements, {long} long responses");
    for doc in std::fs::read_to_string(tmp.path().join("corpus.txt")).unwrap().lines() {
        let v = checker.check(doc);
        assert_eq!((v.false_statements, v.unparseable), (0, 0), "{doc}");
        assert!(doc.split_whitespace().count() >= 100, "a short document: {doc}");
        assert!(!tok.encode(doc).unwrap().contains(&unk));
    }
}

#[test]
fn the_checker_catches_wrong_facts_and_made_up_animals() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let world = World::generate(30, &mut rng);
    let checker = Checker::new(&world);
    let a = &world.animals[0];
    let name = &a.name;
    let wrong_colour = COLOURS[(a.colour + 1) % COLOURS.len()];
    let right_colour = COLOURS[a.colour];
    assert_eq!(checker.check(&format!("the {name} is {right_colour} .")).true_statements, 1);
    for wrong in [
        format!("the {name} is {wrong_colour} ."),
        format!("the {name} has {wrong_colour} fur ."),
        format!("the {name} lives in the {} .", HABITATS[(a.habitat + 1) % HABITATS.len()]),
        format!("the zzyzx is {right_colour} ."),
        format!("the {name} is a friend of the {} .", world.animals[a.enemy].name),
        format!("the {name} is afraid of the {} .", world.animals[a.friend].name),
        format!("the {name} and the zzyzx are friends ."),
    ] {
        let v = checker.check(&wrong);
        assert_eq!((v.true_statements, v.false_statements, v.unparseable), (0, 1, 0), "{wrong}");
    }
    // A description with one attribute swapped: precision 6/7.
    let described = world.describe(0, &mut rng);
    let swapped = described.replacen(&format!(" {right_colour} "), &format!(" {wrong_colour} "), 1);
    let v = checker.check(&swapped);
    assert_eq!((v.true_statements, v.false_statements), (6, 1), "{swapped}");
    assert!((v.precision() - 6.0 / 7.0).abs() < 1e-12);
    // A list with an animal that does not live there, and a made-up one.
    let h = HABITATS[a.habitat];
    let intruder = world.animals.iter().find(|x| x.habitat != a.habitat).unwrap();
    let v = checker.check(&format!("the {name} , the {} and the qqq live in the {h} .", intruder.name));
    assert_eq!((v.true_statements, v.false_statements), (1, 2));
    // Text outside the language is unparseable, not true.
    let v = checker.check("the the the . blue is . the end .");
    assert_eq!((v.true_statements, v.false_statements, v.unparseable), (0, 0, 2));
    // A story states the relation it is about and is checked like any other text.
    let story = world.story(0, a.enemy, &mut rng);
    let v = checker.check(&story);
    assert_eq!((v.false_statements, v.unparseable), (0, 0), "{story}");
    let parsed = checker.parse(&"the x hid from the y .".split_whitespace().collect::<Vec<_>>()).unwrap();
    assert_eq!(parsed, vec![Statement::Fact { subject: "x".into(), relation: Relation::Enemy, object: "y".into() }]);
}

#[test]
fn splits_are_disjoint_and_held_out_families_are_never_trained() {
    let tmp = tempfile::tempdir().unwrap();
    tasks::write_dataset(tmp.path(), &sizes(), 5).unwrap();
    let mut by_file = Vec::new();
    for (file, split) in [
        ("train.jsonl", Some(Split::Train)),
        ("valid.jsonl", Some(Split::Valid)),
        ("test.jsonl", Some(Split::Test)),
        ("held_out.jsonl", None),
    ] {
        let rs = rows(&tmp.path().join(file));
        let mut set = BTreeSet::new();
        for r in &rs {
            let i = instruction(r);
            if let Some(s) = split {
                assert_eq!(split_of(&i), s, "{file}: {i}");
            }
            let family = Family::from_name(r["family"].as_str().unwrap()).unwrap();
            assert_eq!(Family::HELD_OUT.contains(&family), split.is_none(), "{file}: {i}");
            set.insert(i);
        }
        by_file.push(set);
    }
    for i in 0..by_file.len() {
        for j in i + 1..by_file.len() {
            assert!(by_file[i].is_disjoint(&by_file[j]));
        }
    }
    // Multi-answer test instructions carry several different references.
    let test = rows(&tmp.path().join("test.jsonl"));
    let multi = test.iter().find(|r| r["family"] == "describe").unwrap();
    assert!(outputs(multi).len() >= 4);
    // Every family has instructions in this world.
    let world = World::generate(40, &mut ChaCha8Rng::seed_from_u64(5));
    for f in Family::ALL {
        assert!(!Task::all(&world, f).is_empty(), "{f:?}");
    }
}

#[test]
fn generation_is_deterministic_under_the_seed() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tasks::write_dataset(a.path(), &sizes(), 3).unwrap();
    tasks::write_dataset(b.path(), &sizes(), 3).unwrap();
    tasks::write_dataset(c.path(), &sizes(), 4).unwrap();
    for f in
        ["train.jsonl", "valid.jsonl", "test.jsonl", "held_out.jsonl", "corpus.txt", "world.json", "tokenizer.json"]
    {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(f)).unwrap();
        assert_eq!(read(&a), read(&b), "{f} differs between two runs with one seed");
        if f != "tokenizer.json" {
            assert_ne!(read(&a), read(&c), "{f} does not depend on the seed");
        }
    }
}
