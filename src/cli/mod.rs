//! The `voxconv` command line.

mod bench;
mod client;
pub mod connect;
mod conv3d;
mod kernel_bench;
mod model_bench;
mod phantom;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use conv3d::Conv3dArgs;
pub use kernel_bench::KernelBenchArgs;

#[derive(Debug, Parser)]
#[command(
    name = "voxconv",
    version,
    about = "3-D convolution for medical volumes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one Conv3D on .npy files with the fast kernel.
    Conv3d(Conv3dArgs),
    /// Time the kernel on the workloads of a TOML file.
    KernelBench(KernelBenchArgs),
    /// Time whole networks of a model repository in process (no server): median latency,
    /// working memory, time per strategy.
    ModelBench(model_bench::ModelBenchArgs),
    /// Run the gRPC server. Built-in models: sobel3d, gaussian3d, filterbank16 and one
    /// bench-<workload> per reference workload (ListModels lists them); more from
    /// --model-repository.
    Serve(Box<crate::config::ServeArgs>),
    /// Send a volume through a model over the streaming RPC.
    Infer(client::InferArgs),
    /// Ask a server whether it is SERVING (exit 0) or not (exit 1).
    Health(client::HealthArgs),
    /// Closed-loop load against a server: requests/s, MB/s, latency percentiles, errors.
    Bench(bench::BenchArgs),
    /// Write a serialized request (Infer or KServe ModelInfer) for `ghz --binary-file`.
    GhzData(bench::GhzDataArgs),
    /// Make a caller token and its line for the --auth-tokens file.
    Token(connect::TokenArgs),
    /// Write a 3-D Shepp-Logan phantom (NIfTI or .npy) to try the service without patient data.
    Phantom(phantom::PhantomArgs),
}

/// Parses the command line. Usage and configuration errors exit 64 (EX_USAGE) with one
/// line; `--help` and `--version` exit 0.
pub fn parse() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            Err(
                if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(serve::EXIT_CONFIG)
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("voxconv: {line}");
            Err(ExitCode::from(serve::EXIT_CONFIG))
        }
    }
}

/// Runs a parsed command; errors are printed as one line on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Conv3d(a) => conv3d::run(a),
        Command::KernelBench(a) => kernel_bench::run(a),
        Command::ModelBench(a) => model_bench::run(a),
        Command::Serve(a) => return serve::run(*a),
        Command::Infer(a) => client::infer(a),
        Command::Health(a) => client::health(a),
        Command::Phantom(a) => phantom::run(a),
        Command::Token(a) => connect::token(a),
        Command::Bench(a) => bench::bench(a),
        Command::GhzData(a) => bench::ghz_data(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxconv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `D,H,W` (three non-negative integers).
pub fn parse_triple(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 3 {
        return Err(format!("expected D,H,W (three integers), got {s:?}"));
    }
    let mut out = [0usize; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse()
            .map_err(|_| format!("expected a non-negative integer, got {p:?} in {s:?}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every sliding-window flag parses into the request (clap checks value types only
    /// when a flag is given).
    #[test]
    fn sliding_window_flags_parse() {
        let cli = Cli::try_parse_from([
            "voxconv",
            "infer",
            "--model",
            "m",
            "--input",
            "x.npy",
            "--output",
            "y.npy",
            "--sliding-window",
            "--roi",
            "96,96,64",
            "--overlap",
            "0.5",
            "--sigma-scale",
            "0.1,0.2,0.3",
            "--blend",
            "constant",
            "--sw-batch",
            "2",
            "--mirror",
            "0,2",
            "--labels",
        ])
        .unwrap();
        let Command::Infer(a) = cli.command else {
            panic!("infer")
        };
        let w = a.window.to_pb().unwrap();
        assert_eq!(w.roi, vec![96, 96, 64]);
        assert_eq!(w.overlap, vec![0.5]);
        assert_eq!(w.sigma_scale, vec![0.1, 0.2, 0.3]);
        assert_eq!(w.batch, 2);
        assert_eq!(w.mirror.unwrap().axes, vec![0, 2]);
        assert_eq!(
            w.output,
            crate::proto::voxconv::v1::WindowOutput::Labels as i32
        );
        let none = Cli::try_parse_from([
            "voxconv",
            "infer",
            "--model",
            "m",
            "--input",
            "x",
            "--output",
            "y",
            "--sliding-window",
            "--mirror",
            "none",
        ])
        .unwrap();
        let Command::Infer(a) = none.command else {
            panic!("infer")
        };
        assert_eq!(
            a.window.to_pb().unwrap().mirror.unwrap().axes,
            Vec::<u32>::new()
        );
        // Window options without --sliding-window are a usage error.
        assert!(Cli::try_parse_from([
            "voxconv", "infer", "--model", "m", "--input", "x", "--output", "y", "--labels",
        ])
        .is_err());
    }
}
