fn main() {
    if let Err(e) = overopt::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
