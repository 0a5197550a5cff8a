//! Model directories: save/reload gives identical logits for every family; sharded indexes
//! load; unsupported or broken inputs get errors that name the file, tensor or option.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use minillm::model::{load_model, save_model};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_model(dir, &Device::Cpu, DType::F32).err().expect("loading should fail"))
}

#[test]
fn save_then_reload_gives_identical_logits_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let model = load(name);
        let out = tmp.path().join(name);
        save_model(&model, &out, DType::F32).unwrap();
        // Saving again over an existing directory replaces it atomically.
        save_model(&model, &out, DType::F32).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{name}: {f} missing");
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(leftovers.iter().all(|n| !n.to_string_lossy().starts_with('.')), "temporary files left: {leftovers:?}");
        let back = load_model(&out, &Device::Cpu, DType::F32).unwrap();
        let r = reference(name);
        let ids = ids_u32(&r["left.input_ids"]);
        let mask = mask_of(&r["left.attention_mask"]);
        let a = model.lm.forward(&ids, &mask, None).unwrap();
        let b = back.lm.forward(&ids, &mask, None).unwrap();
        assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap(), "{name}");
        // Same tensor names as transformers wrote (tied heads are not duplicated).
        let names = |d: &Path| {
            let mut v: Vec<String> = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), names(&fixtures().join("models").join(name)), "{name}: tensor names");
    }
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    let src = fixtures().join("models/llama");
    copy_dir(&src, &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(k.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    let single = load("llama");
    let r = reference("llama");
    let ids = ids_u32(&r["full.input_ids"]);
    let mask = mask_of(&r["full.attention_mask"]);
    let x = sharded.lm.forward(&ids, &mask, None).unwrap().to_vec3::<f32>().unwrap();
    let y = single.lm.forward(&ids, &mask, None).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(x, y);

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn pytorch_bin_weights_get_a_conversion_hint() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("models/gpt2/config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"not really").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("safe_serialization=True"), "{e}");
}

#[test]
fn broken_directories_are_reported_by_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(load_err(&tmp.path().join("nope")).contains("does not exist"));
    assert!(load_err(tmp.path()).contains("config.json"));

    // A tensor with the wrong shape.
    let dir = tmp.path().join("bad_shape");
    copy_dir(&fixtures().join("models/gpt2"), &dir);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["n_inner"] = 96.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("transformer.h.0.mlp.c_fc.weight") && e.contains("[64, 256]") && e.contains("[64, 96]"), "{e}");

    // A missing tensor: an untied head the file does not have.
    cfg["n_inner"] = serde_json::Value::Null;
    cfg["tie_word_embeddings"] = false.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");

    // Unknown architecture and unsupported options.
    for (key, value, expect) in [
        ("model_type", serde_json::json!("t5"), "model_type `t5` is not supported"),
        ("add_cross_attention", serde_json::json!(true), "add_cross_attention"),
        ("activation_function", serde_json::json!("quick_gelu"), "quick_gelu"),
    ] {
        let mut c = cfg.clone();
        c["tie_word_embeddings"] = true.into();
        c[key] = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(expect), "{key}: {e}");
    }

    let ldir = tmp.path().join("bad_rope");
    copy_dir(&fixtures().join("models/llama"), &ldir);
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ldir.join("config.json")).unwrap()).unwrap();
    c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    std::fs::write(ldir.join("config.json"), c.to_string()).unwrap();
    assert!(load_err(&ldir).contains("rope scaling type `yarn` is not supported"));

    // An empty tokenizer (what transformers 5 writes from an ignored vocab_file argument).
    let good_cfg = std::fs::read_to_string(fixtures().join("models/llama/config.json")).unwrap();
    std::fs::write(ldir.join("config.json"), &good_cfg).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ldir.join("tokenizer.json")).unwrap()).unwrap();
    tok["model"]["vocab"] = serde_json::json!({});
    tok["model"]["merges"] = serde_json::json!([]);
    tok["added_tokens"] = serde_json::json!([]);
    std::fs::write(ldir.join("tokenizer.json"), tok.to_string()).unwrap();
    assert!(load_err(&ldir).contains("empty vocabulary"), "{}", load_err(&ldir));

    std::fs::write(ldir.join("config.json"), "{ not json").unwrap();
    assert!(load_err(&ldir).contains("is not valid JSON"));
}

/// transformers 4.x wrote `rope_theta` and `torch_dtype` at the top level; both layouts load
/// to the same model.
#[test]
fn transformers_4_config_layout_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen_v4");
    copy_dir(&fixtures().join("models/qwen2"), &dir);
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let theta = c["rope_parameters"]["rope_theta"].clone();
    let obj = c.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.remove("dtype");
    obj.insert("rope_theta".into(), theta);
    obj.insert("torch_dtype".into(), "float32".into());
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let v4 = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    let r = reference("qwen2");
    let ids = ids_u32(&r["right.input_ids"]);
    let mask = mask_of(&r["right.attention_mask"]);
    let d = max_diff_masked(&v4.lm.forward(&ids, &mask, None).unwrap(), &r["right.logits"], &mask);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn the_parameter_count_read_from_the_headers_is_the_models() {
    for name in FAMILIES {
        let dir = fixtures().join("models").join(name);
        let counted = minillm::model::checkpoint::stored_parameter_count(&dir).unwrap();
        assert_eq!(counted, load(name).lm.params().num_elements(), "{name}");
    }
    // GPT-2 checkpoints saved by older `transformers` also store each layer's causal mask,
    // `attn.bias`, which is no parameter.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gpt2");
    copy_dir(&fixtures().join("models/gpt2"), &dir);
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let before = minillm::model::checkpoint::stored_parameter_count(&dir).unwrap();
    let mask = candle_core::Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("transformer.h.0.attn.bias".into(), mask);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    assert_eq!(minillm::model::checkpoint::stored_parameter_count(&dir).unwrap(), before);
}
