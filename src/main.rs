fn main() {
    std::process::exit(krill::cli::main(std::env::args().collect()));
}
