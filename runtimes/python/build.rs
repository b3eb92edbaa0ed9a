//! Links libpython with an rpath to its directory, so the loader finds the interpreter it was
//! built against (a pyenv or venv build is not on the system's library path).
fn main() {
    let cfg = pyo3_build_config::get();
    if let Some(dir) = &cfg.lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
