fn main() {
    overopt::util::tune_allocator();
    if let Err(e) = overopt::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
