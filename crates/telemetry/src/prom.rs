//! Prometheus text exposition (format 0.0.4) without a metrics library: components
//! keep plain atomics and render them here.

use std::fmt::{Display, Write};

/// The `Content-Type` of the text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A page of metrics being written.
#[derive(Default)]
pub struct Text(String);

impl Text {
    /// An empty page.
    pub fn new() -> Text {
        Text::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines (`kind` is `counter`, `gauge`
    /// or `histogram`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Text {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        self
    }

    /// One sample. Label values are fixed strings chosen by the code (bounded sets),
    /// escaped anyway.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Text {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) -> &mut Text {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// `netbore_build_info{component, version} 1`, the same family on every binary, so
    /// a dashboard can tell which versions run.
    pub fn build_info(&mut self, component: &str, version: &str) -> &mut Text {
        self.family(
            "netbore_build_info",
            "gauge",
            "Always 1; the labels name the component and its version.",
        );
        self.sample(
            "netbore_build_info",
            &[("component", component), ("version", version)],
            1,
        )
    }

    /// The page.
    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_and_labels() {
        let mut t = Text::new();
        t.family("a_total", "counter", "A.")
            .sample("a_total", &[("code", "x\"y")], 2);
        t.single("b", "gauge", "B.", 1);
        assert_eq!(
            t.finish(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{code=\"x\\\"y\"} 2\n# HELP b B.\n# TYPE b gauge\nb 1\n"
        );
    }
}
