//! Configuration text (YAML, or JSON when the first byte is odd) through the document
//! parser, typing and validation: errors are fine, panics and hangs are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polygate_config::Document;
use polygate_model::env::MapEnv;
use polygate_model::load::Format;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = if first & 1 == 1 { Format::Json } else { Format::Yaml };
    let mut text = text.to_owned();
    if format == Format::Yaml {
        text.push_str("\n#END\n");
    }
    if let Ok(doc) = Document::parse(&text, format, &MapEnv::default())
        && let Ok((cfg, _, _)) = doc.typed()
    {
        let _ = polygate_model::validate::validate(&cfg);
    }
});
