fn main() {
    println!("Hello from your Kennel VM!");
}
