//! The popbridge binary: everything is in the library, from
//! [`popbridge::cli::main`] down.

fn main() -> std::process::ExitCode {
    popbridge::cli::main()
}
