//! Runs the codec benchmark:
//! `cargo run --release -p meshtune-protocol --example codec_bench [params] [label filter]`.

use meshtune_protocol::bench::{
    CodecBenchConfig, default_bench_codecs, render_table, run_codec_bench,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = CodecBenchConfig::default();
    let mut args = std::env::args().skip(1);
    if let Some(params) = args.next() {
        config.params = params.parse()?;
    }
    if let Some(filter) = args.next() {
        config.codecs = default_bench_codecs(config.zstd_level, config.block_size)
            .into_iter()
            .filter(|codec| codec.label.contains(&filter))
            .collect();
    }
    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "params {} ({} MB f32), best of {}, loadavg before: {}",
        config.params,
        config.params * 4 / 1_000_000,
        config.repeats,
        loadavg().trim()
    );
    let rows = run_codec_bench(&config)?;
    print!("{}", render_table(&rows));
    println!("loadavg after: {}", loadavg().trim());
    Ok(())
}
