//! Tokenizers (`tokenizer.json`, or GPT-2 BPE from `vocab.json` + `merges.txt`) and the
//! instruction prompt template with the prompt/response tokenisation of the released MiniLLM
//! implementation.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::AddedToken;

/// A text tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Builds GPT-2's byte-level BPE from its vocabulary (`vocab.json` / `encoder.json`) and
    /// merges (`merges.txt` / `vocab.bpe`), with `<|endoftext|>` as special token.
    pub fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self> {
        for f in [vocab, merges] {
            if !f.is_file() {
                bail!("tokenizer file {} does not exist", f.display());
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| anyhow!("cannot build BPE from {} and {}: {e}", vocab.display(), merges.display()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevelDecoder::default()))
            .with_post_processor(Some(ByteLevelProcessor::new(true, true, true)));
        inner
            .add_special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
            .map_err(|e| anyhow!("adding <|endoftext|>: {e}"))?;
        Ok(Self { inner })
    }

    /// Wraps a `tokenizers` object built in code.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// The tokenizer of a model directory: `tokenizer.json`, else GPT-2 BPE from `vocab.json` +
    /// `merges.txt` (or `encoder.json` + `vocab.bpe`); `None` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json).map(Some);
        }
        // GPT-2's BPE as `transformers` saves it, or as OpenAI released it.
        for (vocab, merges) in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")] {
            let (vocab, merges) = (dir.join(vocab), dir.join(merges));
            if vocab.is_file() && merges.is_file() {
                return Self::from_gpt2_files(&vocab, &merges).map(Some);
            }
        }
        Ok(None)
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (e.g. Llama's BOS), as
    /// `transformers`' `tokenizer.encode` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// The text of a generated response: its EOS ids (`eos`) dropped, special tokens skipped.
    pub fn decode_response(&self, response: &[u32], eos: &[u32]) -> Result<String> {
        let ids: Vec<u32> = response.iter().copied().filter(|t| !eos.contains(t)).collect();
        self.decode(&ids, true)
    }

    /// Number of ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
        crate::atomic::write_file(path, json.as_bytes()).context("writing tokenizer.json")
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";
const PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n";

/// The instruction prompt template of MiniLLM (Alpaca style). An empty `input` selects the
/// no-input variant, as the released data processing does.
pub fn format_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{PROMPT_NO_INPUT}{instruction}\n\n### Response:\n")
    } else {
        format!("{PROMPT_WITH_INPUT}{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

/// A prompt and its response as token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedExample {
    /// `tokens(prompt)`.
    pub prompt: Vec<u32>,
    /// `tokens(prompt + response)[len(prompt):] + [eos]`.
    pub response: Vec<u32>,
}

/// Tokenises a prompt/response pair as the released implementation does: the response ids are
/// the tail of the jointly tokenised text (so merges across the boundary match what a model
/// sees at generation time), followed by EOS.
pub fn encode_example(tok: &Tokenizer, prompt: &str, response: &str, eos: u32) -> Result<EncodedExample> {
    let prompt_ids = tok.encode(prompt)?;
    let full = tok.encode(&format!("{prompt}{response}"))?;
    // Sliced by length, as the released implementation does, even where a tokenizer merges
    // across the prompt/response boundary (GPT-2's byte-level BPE does not after "\n").
    let cut = prompt_ids.len().min(full.len());
    let mut resp = full[cut..].to_vec();
    resp.push(eos);
    Ok(EncodedExample { prompt: prompt_ids, response: resp })
}
