//! How an error reads to the user: its chain of contexts and causes on one line.

/// `e`'s chain joined by `": "`, as anyhow's `{:#}` prints it, less any cause whose text the
/// line already ends with: libraries often wrap an I/O error in one whose message repeats it
/// (safetensors' `I/O error: File too large` over `File too large`), which `{:#}` would print
/// twice.
pub fn render(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn a_cause_repeated_by_its_wrapper_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "I/O error: {}", self.0)
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Wrapper(io)).context("writing run/model.safetensors");
        assert_eq!(
            format!("{e:#}"),
            "writing run/model.safetensors: I/O error: No space left on device: No space left on device"
        );
        assert_eq!(render(&e), "writing run/model.safetensors: I/O error: No space left on device");
        let plain = anyhow::anyhow!("bad line 3").context("reading data.jsonl");
        assert_eq!(render(&plain), format!("{plain:#}"));
    }
}
