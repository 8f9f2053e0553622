//! Result files: `<suite>.json` (everything, raw VMM answers included) and `<suite>.md` (a table).

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::facts::Facts;

/// One suite's results.
#[derive(Debug, Serialize)]
pub struct Report {
    pub suite: String,
    pub command: String,
    pub facts: Facts,
    /// Parameters of the run (sizes, timeouts, migration parameters).
    pub params: Value,
    /// Free-form notes shown under the table (method, caveats, what could not run).
    pub notes: Vec<String>,
    /// The tables: title, column names, rows of cells.
    pub tables: Vec<Table>,
    /// One JSON object per measured run (including failures).
    pub runs: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }
}

impl Report {
    pub fn new(suite: &str, facts: Facts, params: Value) -> Report {
        Report {
            suite: suite.into(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            facts,
            params,
            notes: Vec::new(),
            tables: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Writes `<out>/<suite>.json` and `<out>/<suite>.md`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let json = out.join(format!("{}.json", self.suite));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let md = out.join(format!("{}.md", self.suite));
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        tracing::info!("wrote {} and {}", json.display(), md.display());
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let f = &self.facts;
        let mut s = format!("# tern-bench: `{}`\n\n", self.suite);
        s += &format!("Command: `{}`\n\n", self.command);
        s += "| fact | value |\n| --- | --- |\n";
        let facts = [
            ("date (UTC)", f.date_utc.clone()),
            ("nproc", f.nproc.to_string()),
            ("memory", f.mem_total.clone()),
            ("kernel", f.kernel.clone()),
            ("CPU", f.cpu.describe()),
            ("KVM", f.kvm_flavour.clone()),
            ("QEMU", f.qemu.clone().unwrap_or_else(|| "not found".into())),
            (
                "QEMU -cpu",
                f.qemu_cpu.clone().unwrap_or_else(|| "–".into()),
            ),
            (
                "tern binary",
                f.tern.clone().unwrap_or_else(|| "not found".into()),
            ),
            ("git commit", f.git_commit.clone()),
            ("TSC kHz", format!("{} ({})", f.tsc_khz, f.tsc_source)),
            ("load average at start", f.loadavg.clone()),
            (
                "load average at end",
                std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            ),
        ];
        for (k, v) in facts {
            s += &format!("| {k} | {} |\n", cell(&v));
        }
        for t in &self.tables {
            s += &format!("\n## {}\n\n", t.title);
            s += &format!("| {} |\n", t.columns.join(" | "));
            s += &format!("|{}\n", " --- |".repeat(t.columns.len()));
            for r in &t.rows {
                let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
                s += &format!("| {} |\n", cells.join(" | "));
            }
        }
        if !self.notes.is_empty() {
            s += "\n## Notes\n\n";
            for n in &self.notes {
                s += &format!("- {n}\n");
            }
        }
        s += &format!(
            "\nParameters:\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(&self.params).unwrap_or_default()
        );
        s
    }
}

fn cell(v: &str) -> String {
    v.replace('|', "\\|").replace('\n', " ")
}

/// Formatting helpers for table cells ("–" when a value is missing).
pub fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0} ms"))
        .unwrap_or_else(|| "–".into())
}

pub fn secs(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2} s")).unwrap_or_else(|| "–".into())
}

pub fn mib(v: Option<u64>) -> String {
    v.map(|x| format!("{:.1} MiB", x as f64 / 1048576.0))
        .unwrap_or_else(|| "–".into())
}

pub fn num<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "–".into())
}

pub fn ratio(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into())
}
