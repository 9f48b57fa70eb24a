//! The figures a tier measures, printed as one `VMLAB FIGURE <name> <ms> ms` line each so CI logs
//! can be grepped and docs/vm-lab.md can quote them.

use std::time::Duration;

/// Collected figures, in the order measured.
#[derive(Debug, Default)]
pub struct Figures {
    rows: Vec<(String, f64)>,
}

impl Figures {
    /// Records `name` = `d` and prints it at once (so a later failure does not lose it).
    pub fn record(&mut self, name: &str, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        println!("VMLAB FIGURE {name} {ms:.1} ms");
        self.rows.push((name.to_string(), ms));
    }

    /// Records a value in milliseconds reported by someone else (e.g. the guest agent).
    pub fn record_ms(&mut self, name: &str, ms: f64) {
        println!("VMLAB FIGURE {name} {ms:.1} ms");
        self.rows.push((name.to_string(), ms));
    }

    /// A recorded value, in milliseconds.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.rows.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// A Markdown table of everything recorded.
    pub fn table(&self) -> String {
        let mut s = String::from("| figure | ms |\n|---|---:|\n");
        for (n, v) in &self.rows {
            s.push_str(&format!("| {n} | {v:.1} |\n"));
        }
        s
    }
}

/// Median of `samples`, in milliseconds; `None` when empty.
pub fn median_ms(samples: &[Duration]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        assert_eq!(median_ms(&ms(&[5, 1, 3])), Some(3.0));
        assert_eq!(median_ms(&ms(&[4, 1, 3, 2])), Some(2.5));
        assert_eq!(median_ms(&[]), None);
    }

    #[test]
    fn figures_keep_order_and_values() {
        let mut f = Figures::default();
        f.record("a", Duration::from_millis(1500));
        f.record_ms("b", 2.0);
        assert_eq!(f.get("a"), Some(1500.0));
        assert_eq!(f.get("b"), Some(2.0));
        assert_eq!(f.get("c"), None);
        assert!(f.table().contains("| a | 1500.0 |\n| b | 2.0 |"));
    }
}
