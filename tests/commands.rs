//! The training commands end to end through the configuration layer: SFT → distill from the
//! SFT checkpoint (paper preset, ablation switches), SeqKD (generations written then reused),
//! KD, GKD, OPD, DistiLLM; configuration and tokenizer-mismatch errors; every shipped config parses.

mod common;

use std::path::Path;

use common::*;
use minillm::recipe::{Method, Recipe, RunConfig};

fn run_method(method: Method, config: &RunConfig) -> anyhow::Result<minillm::train::trainer::TrainOutcome> {
    Ok(Recipe::new(method, config.clone()).run()?.outcome)
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn base(tmp: &Path) -> Vec<String> {
    let student = tiny_model_dir(&tmp.join("student"), "gpt2", 32, 1, 31);
    let teacher = tiny_model_dir(&tmp.join("teacher"), "llama", 48, 1, 32);
    std::fs::write(tmp.join("train.jsonl"), letters_jsonl(48, 33)).unwrap();
    std::fs::write(tmp.join("valid.jsonl"), letters_jsonl(8, 34)).unwrap();
    vec![
        format!("model.student={}", q(&student)),
        format!("model.teacher={}", q(&teacher)),
        format!("data.train={}", q(&tmp.join("train.jsonl"))),
        format!("data.valid={}", q(&tmp.join("valid.jsonl"))),
        "data.max_len=256".into(), // the tiny models' context
        "train.max_steps=4".into(),
        "train.batch_size=4".into(),
        "train.eval_interval=2".into(),
        "train.save_interval=2".into(),
    ]
}

fn with(mut v: Vec<String>, extra: &[String]) -> Vec<String> {
    v.extend(extra.iter().cloned());
    v
}

#[test]
fn sft_then_distill_then_seqkd_and_kd_run_from_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let b = base(tmp.path());
    let sft_out = tmp.path().join("runs/sft");
    let cfg = RunConfig::load(None, &with(b.clone(), &[format!("out={}", q(&sft_out))])).unwrap();
    let out = run_method(Method::Sft, &cfg).unwrap();
    assert_eq!(out.steps, 4);
    assert!(sft_out.join("config.toml").is_file() && sft_out.join("best/model.safetensors").is_file());
    let resolved = RunConfig::load(Some(&sft_out.join("config.toml")), &[]).unwrap();
    assert_eq!(resolved, cfg, "the written config.toml reproduces the run's configuration");

    // Phase 2 from the SFT checkpoint, paper preset, with an ablation and no PT corpus.
    let distill_out = tmp.path().join("runs/distill");
    let d = with(
        b.clone(),
        &[
            format!("model.student={}", q(&sft_out.join("best"))),
            format!("out={}", q(&distill_out)),
            "distill.preset=\"paper\"".into(),
            "distill.policy.length_norm=false".into(),
            "distill.pt=false".into(),
            "distill.num_rollouts=8".into(),
            "distill.rollout_batch=8".into(),
            "distill.max_new_tokens=6".into(),
            "distill.valid_rollouts=4".into(),
        ],
    );
    let cfg = RunConfig::load(None, &d).unwrap();
    assert!(cfg.distill.single_step_weighted && cfg.distill.pt_kd_ratio == 0.0, "preset applied");
    assert!(!cfg.distill.policy.length_norm && !cfg.distill.policy.whiten, "explicit keys override the preset");
    run_method(Method::Distill, &cfg).unwrap();
    let text = std::fs::read_to_string(distill_out.join("metrics.jsonl")).unwrap();
    assert!(text.contains("\"single\"") && !text.contains("\"pt\""));
    // Each step row times its phases; the loop's own phases account for (almost) all of the
    // step, and the steps that collected rollouts say how long collection took.
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r.get("lr").is_some())
        .collect();
    assert_eq!(steps.len(), 4);
    for r in &steps {
        let p = &r["phases"];
        let loop_phases: f64 =
            ["prepare", "forward", "backward", "update"].iter().map(|k| p[*k].as_f64().unwrap()).sum();
        let secs = r["seconds"].as_f64().unwrap();
        assert!(loop_phases <= secs && loop_phases >= 0.8 * secs, "phases {p} in a step of {secs} s");
        assert!(p.get("pt_forward").is_none(), "no PT term, no PT phase: {p}");
    }
    let collect = steps[0]["phases"]["collect"].as_f64().unwrap();
    assert!(collect > 0.0 && collect <= steps[0]["phases"]["prepare"].as_f64().unwrap(), "{}", steps[0]);
    // Validation at the start and after steps 2 and 4.
    assert_eq!(eval_values(&distill_out, "val_rougeL").len(), 3, "distill validation reports Rouge-L");

    // SeqKD: generations are written once and reused.
    let seq_out = tmp.path().join("runs/seqkd");
    let s = with(
        b.clone(),
        &[format!("out={}", q(&seq_out)), "seqkd.mode=\"pure\"".into(), "seqkd.max_new_tokens=8".into()],
    );
    run_method(Method::SeqKd, &RunConfig::load(None, &s).unwrap()).unwrap();
    let gens = seq_out.join("teacher_generations.jsonl");
    let first = std::fs::read_to_string(&gens).unwrap();
    assert_eq!(first.lines().count(), 48);
    assert!(first.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["output"].is_string()));
    std::fs::remove_dir_all(seq_out.join("checkpoints")).unwrap();
    run_method(Method::SeqKd, &RunConfig::load(None, &s).unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(&gens).unwrap(), first);

    let kd_out = tmp.path().join("runs/kd");
    let b_gkd = b.clone();
    let b_opd = b.clone();
    let b_dm = b.clone();
    let k = with(
        b,
        &[format!("out={}", q(&kd_out)), "kd.divergence=\"jsd:0.3\"".into(), "train.select_by=\"val_rouge_l\"".into()],
    );
    let out = run_method(Method::Kd, &RunConfig::load(None, &k).unwrap()).unwrap();
    assert!(std::fs::read_to_string(kd_out.join("metrics.jsonl")).unwrap().contains("val_kd"));
    let rouge = eval_values(&kd_out, "val_rougeL");
    assert_eq!(rouge.len(), 3);
    assert!(rouge.iter().all(|r| (0.0..=100.0).contains(r)));
    let best = rouge.iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(out.best.unwrap().0, best, "selection by the highest validation Rouge-L");

    // GKD, fully on-policy with the reverse KL, and the run's config.toml reproducing it.
    let gkd_out = tmp.path().join("runs/gkd");
    let gk = with(
        b_gkd,
        &[format!("out={}", q(&gkd_out)), "gkd.lmbda=1.0".into(), "gkd.beta=1.0".into(), "gkd.max_new_tokens=6".into()],
    );
    let cfg = RunConfig::load(None, &gk).unwrap();
    run_method(Method::Gkd, &cfg).unwrap();
    let text = std::fs::read_to_string(gkd_out.join("metrics.jsonl")).unwrap();
    assert_eq!(text.matches("\"on_policy\":1.0").count(), 4, "λ = 1: every step on-policy");
    assert_eq!(RunConfig::load(Some(&gkd_out.join("config.toml")), &[]).unwrap(), cfg);

    // OPD: the distill engine under the opd preset, PPO-clipped variant.
    let opd_out = tmp.path().join("runs/opd");
    let o = with(
        b_opd,
        &[
            format!("out={}", q(&opd_out)),
            "distill.policy.clip_ratio=0.2".into(),
            "distill.num_rollouts=8".into(),
            "distill.rollout_batch=8".into(),
            "distill.max_new_tokens=6".into(),
            "distill.valid_rollouts=4".into(),
        ],
    );
    let cfg = RunConfig::load_with_preset(None, &o, Some(minillm::recipe::Preset::Opd)).unwrap();
    assert!(cfg.distill.alpha == 0.0 && !cfg.distill.single_step && !cfg.distill.pt && cfg.distill.policy.gamma == 0.0);
    assert_eq!(cfg.distill.policy.clip_ratio, Some(0.2), "explicit keys override the preset");
    run_method(Method::Opd, &cfg).unwrap();
    let text = std::fs::read_to_string(opd_out.join("metrics.jsonl")).unwrap();
    assert!(text.contains("\"pg\"") && !text.contains("\"single\""));

    // DistiLLM with the reverse skew KL, starting with θ = 1 (every step fresh or replayed).
    let dm_out = tmp.path().join("runs/distillm");
    let dm = with(
        b_dm,
        &[
            format!("out={}", q(&dm_out)),
            "distillm.divergence=\"srkl:0.1\"".into(),
            "distillm.init_threshold=1.0".into(),
            "distillm.max_new_tokens=6".into(),
        ],
    );
    let cfg = RunConfig::load(None, &dm).unwrap();
    run_method(Method::Distillm, &cfg).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dm_out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("lr").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for r in steps {
        let (fresh, replay) = (r["on_policy"].as_f64().unwrap(), r["replay"].as_f64().unwrap());
        assert!(fresh + replay == 1.0 && r["threshold"] == 1.0, "θ = 1: every step on student samples: {r}");
    }
    assert_eq!(RunConfig::load(Some(&dm_out.join("config.toml")), &[]).unwrap(), cfg);
}

fn eval_values(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("eval").and_then(|e| e.get(key)).and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn mismatched_tokenizers_and_bad_configurations_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = base(tmp.path());
    // A teacher whose vocabulary swaps two tokens.
    let path = tmp.path().join("teacher/tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, c) = (vocab["a"].clone(), vocab["b"].clone());
    vocab.insert("a".into(), c);
    vocab.insert("b".into(), a);
    std::fs::write(&path, tok.to_string()).unwrap();
    let cfg = RunConfig::load(None, &with(b.clone(), &[format!("out={}", q(&tmp.path().join("r")))])).unwrap();
    let e = format!("{:#}", run_method(Method::Kd, &cfg).unwrap_err());
    assert!(e.contains("different tokenizers"), "{e}");

    let e = format!("{:#}", RunConfig::load(None, &["train.learning_rate=1".into()]).unwrap_err());
    assert!(e.contains("learning_rate"), "{e}");
    let e = format!("{:#}", RunConfig::load(None, &["seqkd.mode=\"bogus\"".into()]).unwrap_err());
    assert!(e.contains("seqkd.mode"), "{e}");
    let e = format!("{:#}", RunConfig::load(None, &["distill.preset=\"nope\"".into()]).unwrap_err());
    assert!(e.contains("unknown preset"), "{e}");
    let e = format!("{:#}", RunConfig::load(None, &["kd.divergence=\"xyz\"".into()]).unwrap_err());
    assert!(e.contains("unknown divergence"), "{e}");
    let cfg = RunConfig::load(None, &[]).unwrap();
    let e =
        format!("{:#}", run_method(Method::Sft, &RunConfig { out: Some(tmp.path().join("x")), ..cfg }).unwrap_err());
    assert!(e.contains("model.student"), "{e}");
}

#[test]
fn shipped_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            RunConfig::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 4);
}

/// SeqKD's teacher generations resume after an interruption (a partial file with whole chunks
/// and a torn line) and end identical to an uninterrupted pass.
#[test]
fn seqkd_generations_resume_to_the_uninterrupted_result() {
    use minillm::train::seqkd::{partial_path, teacher_generations, GenerationSettings};
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tiny_model_dir_with_std(&tmp.path().join("teacher"), "gpt2", 32, 1, 35, 0.5);
    let teacher = minillm::model::load_model(&teacher, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let tok = teacher.tokenizer().unwrap();
    std::fs::write(tmp.path().join("p.jsonl"), letters_jsonl(10, 36)).unwrap();
    let opts = minillm::data::instruct::InstructOptions::default();
    let (prompts, _) = minillm::data::instruct::load_instruct(&tmp.path().join("p.jsonl"), tok, 0, &opts).unwrap();
    let settings = GenerationSettings { max_new_tokens: 8, max_len: 256, batch_size: 4, seed: 3 };
    let generate = |path: &Path| teacher_generations(&teacher, tok, &[0], 0, &prompts, &settings, path).unwrap();
    let straight = tmp.path().join("straight.jsonl");
    generate(&straight);
    let reference = std::fs::read_to_string(&straight).unwrap();
    assert_eq!(reference.lines().count(), 10);
    assert!(!partial_path(&straight).exists(), "the partial file is gone once complete");

    // An interrupted pass: one whole chunk of 4, two rows of the next, and a torn line.
    // Row 0 is marked, to see that the partial file's whole chunk is kept rather than redone.
    let resumed = tmp.path().join("resumed.jsonl");
    let rows: Vec<serde_json::Value> = reference.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut partial = String::new();
    for (i, r) in rows.iter().take(6).enumerate() {
        let output = if i == 0 { serde_json::json!("kept from the partial file") } else { r["output"].clone() };
        partial.push_str(&format!("{}\n", serde_json::json!({"index": i, "prompt": r["prompt"], "output": output})));
    }
    partial.push_str("{\"index\": 6, \"prom");
    std::fs::write(partial_path(&resumed), partial).unwrap();
    generate(&resumed);
    let got = std::fs::read_to_string(&resumed).unwrap();
    assert!(got.lines().next().unwrap().contains("kept from the partial file"));
    assert_eq!(got.lines().skip(1).collect::<Vec<_>>(), reference.lines().skip(1).collect::<Vec<_>>());
}

/// Presets survive the TOML layer exactly: `None`s (no reward clip, no ratio clip) included.
#[test]
fn presets_load_exactly() {
    use minillm::recipe::Preset;
    use minillm::train::minillm::DistillConfig;
    for (preset, want) in [
        (Preset::Lmops, DistillConfig::default()),
        (Preset::Paper, DistillConfig::paper()),
        (Preset::Opd, DistillConfig::opd()),
    ] {
        let cfg = RunConfig::load_with_preset(None, &[], Some(preset)).unwrap();
        assert_eq!(cfg.distill, want, "{preset:?}");
        let again =
            RunConfig::load(None, &[format!("distill.preset=\"{}\"", format!("{preset:?}").to_lowercase())]).unwrap();
        assert_eq!(again.distill, want, "{preset:?} named in the file");
    }
}
