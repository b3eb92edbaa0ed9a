//! Records where the JDK that built polygate keeps libjvm (the loader opens it at run time,
//! unless POLYGATE_LIBJVM or JAVA_HOME says otherwise), so the crate builds without a JDK too.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=JAVA_HOME");
    let home = std::env::var_os("JAVA_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            let javac = std::process::Command::new("sh")
                .args([
                    "-c",
                    "readlink -f \"$(command -v javac || command -v java)\"",
                ])
                .output()
                .ok()?;
            let p = PathBuf::from(String::from_utf8_lossy(&javac.stdout).trim());
            Some(p.parent()?.parent()?.to_path_buf())
        });
    let lib = home
        .map(|h| h.join("lib/server/libjvm.so"))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "libjvm.so".to_owned());
    println!("cargo:rustc-env=POLYGATE_DEFAULT_LIBJVM={lib}");
}
