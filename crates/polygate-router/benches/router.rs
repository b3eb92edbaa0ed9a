//! Route table build, single-route update and match at 1k, 10k and 100k routes.
#![allow(missing_docs)]

use std::borrow::Cow;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use polygate_router::{Entry, MatchInput, RouteSpec, Router, VarSource};

struct Vars;
impl VarSource for Vars {
    fn var(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

/// A realistic mix: exact API paths, prefixes, parameterised paths, some with hosts/methods.
fn specs(n: usize) -> Vec<RouteSpec> {
    (0..n)
        .map(|i| {
            let uri = match i % 4 {
                0 => format!("/api/v1/svc{i}/items"),
                1 => format!("/static/app{i}/*"),
                2 => format!("/users{i}/:id/profile"),
                _ => format!("/svc{i}/health"),
            };
            RouteSpec {
                id: i.to_string(),
                uris: vec![uri],
                methods: if i % 3 == 0 {
                    vec!["GET".into(), "POST".into()]
                } else {
                    vec![]
                },
                priority: (i % 5) as i64,
                mode: polygate_router::RouterMode::UriWithParameter,
                ..Default::default()
            }
        })
        .collect()
}

fn compile(specs: &[RouteSpec]) -> Vec<Entry<()>> {
    specs
        .iter()
        .map(|s| Entry::compile(s, ()).expect("valid"))
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.measurement_time(Duration::from_secs(3)).sample_size(10);
    for &n in &[1_000usize, 10_000, 100_000] {
        let s = specs(n);
        g.bench_with_input(BenchmarkId::new("build", n), &s, |b, s| {
            b.iter(|| black_box(Router::build(compile(s))))
        });
        let router = Router::build(compile(&s));
        let changed = RouteSpec {
            id: (n / 2).to_string(),
            uris: vec!["/changed/route".into()],
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("update_one", n), &router, |b, r| {
            b.iter(|| {
                let mut next = r.clone();
                next.upsert(Entry::compile(&changed, ()).expect("valid"));
                black_box(next)
            })
        });
        let paths = [
            format!("/api/v1/svc{}/items", (n / 4) * 4),
            format!("/static/app{}/js/main.js", (n / 4) * 4 + 1),
            format!("/users{}/42/profile", (n / 4) * 4 + 2),
            "/not/found".to_string(),
        ];
        for (name, p) in ["exact", "prefix", "param", "miss"]
            .iter()
            .zip(paths.iter())
        {
            g.bench_with_input(BenchmarkId::new(format!("match_{name}"), n), p, |b, p| {
                b.iter(|| {
                    let input = MatchInput {
                        path: p,
                        host: Some("example.com"),
                        method: "GET",
                        remote_addr: None,
                        vars: &Vars,
                    };
                    black_box(router.find(&input).map(|m| m.entry.id.len()))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
