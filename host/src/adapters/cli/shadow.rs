//! `edgeproxy policy shadow status`: the running proxy's shadow report (its admin API's
//! `/policy/shadow`), as a summary or JSON.

use serde_json::Value;

use super::output;

#[derive(Debug, clap::Subcommand)]
pub enum ShadowCommand {
    /// The shadow policy against the live one: agreement, pick tables, recent disagreements.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// The report as text: the headline, the pick tables (top 10) and the last disagreements.
pub fn render(r: &Value) -> String {
    let mut out = format!(
        "shadow {} ({}), {}% of decisions\n",
        r["policy"]["name"].as_str().unwrap_or("?"),
        r["policy"]["hash"].as_str().unwrap_or("?"),
        r["sample_percent"]
    );
    out += &format!(
        "compared {}, agreed {}, disagreed {} ({}), shadow faults {}\n",
        r["compared"],
        r["agreed"],
        r["disagreed"],
        r["agreement"]
            .as_f64()
            .map_or("no decisions yet".to_owned(), |a| format!(
                "{:.1}% agreement",
                a * 100.0
            )),
        r["faults"]
    );
    for (title, key) in [("by backend", "by_backend"), ("by region", "by_region")] {
        let rows: Vec<Vec<String>> = r[key]
            .as_array()
            .into_iter()
            .flatten()
            .take(10)
            .map(|p| {
                vec![
                    p["live"].as_str().unwrap_or("").to_owned(),
                    p["shadow"].as_str().unwrap_or("").to_owned(),
                    p["decisions"].to_string(),
                ]
            })
            .collect();
        out += &format!("\n{title}:\n");
        out += &output::render(&["LIVE", "SHADOW", "DECISIONS"], &rows);
    }
    let recent: Vec<Vec<String>> = r["recent_disagreements"]
        .as_array()
        .into_iter()
        .flatten()
        .take(10)
        .map(|d| {
            vec![
                d["at"].as_str().unwrap_or("").to_owned(),
                d["client_country"].as_str().unwrap_or("-").to_owned(),
                d["live"].as_str().unwrap_or("").to_owned(),
                d["shadow"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    out += "\nrecent disagreements:\n";
    out += &output::render(&["AT", "COUNTRY", "LIVE", "SHADOW"], &recent);
    out
}
