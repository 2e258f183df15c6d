//! Every SQL function has one source file, `src/store/postgres/functions/<name>.sql`, with its
//! whole contract in its header; migrations install it. The database a fresh migration run
//! builds must hold exactly those functions, with exactly those parameters and bodies.

use std::collections::BTreeMap;
use std::path::Path;

use sqlx::PgPool;

/// A function as its source file declares it.
#[derive(Debug, PartialEq)]
struct Declared {
    /// Parameters with single spaces, as `pg_get_function_arguments` prints them.
    arguments: String,
    /// The text between the `$$` quotes, as PostgreSQL keeps it in `pg_proc.prosrc`.
    body: String,
    /// Its `SET name = value` clauses as `name=value`, as `pg_proc.proconfig` keeps them.
    settings: Vec<String>,
}

fn declared(source: &str, name: &str) -> Declared {
    let head = format!("CREATE OR REPLACE FUNCTION {name}(");
    let start = source
        .find(&head)
        .unwrap_or_else(|| panic!("{name}.sql declares `{head}`"))
        + head.len();
    let arguments = &source[start..start + source[start..].find(')').unwrap()];
    let arguments = arguments
        .split(',')
        .map(|argument| argument.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|argument| !argument.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    let open = source.find("$$").expect("a $$-quoted body") + 2;
    let close = source.rfind("$$").unwrap();
    let settings = source[start..open]
        .lines()
        .filter_map(|line| line.trim().strip_prefix("SET "))
        .map(|setting| setting.split_whitespace().collect::<String>())
        .collect();
    Declared {
        arguments,
        body: source[open..close].to_owned(),
        settings,
    }
}

fn source_files() -> BTreeMap<String, Declared> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/postgres/functions");
    std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let source = std::fs::read_to_string(&path).unwrap();
            let function = declared(&source, &name);
            (name, function)
        })
        .collect()
}

#[sqlx::test]
async fn every_sql_function_in_the_database_is_its_source_file(pool: PgPool) {
    let installed: Vec<(String, String, String, Vec<String>)> = sqlx::query_as(
        "SELECT p.proname::text, pg_get_function_arguments(p.oid), p.prosrc,
                coalesce(p.proconfig, '{}')
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let installed: BTreeMap<String, Declared> = installed
        .into_iter()
        .map(|(name, arguments, body, settings)| {
            let function = Declared {
                arguments,
                body,
                settings,
            };
            (name, function)
        })
        .collect();
    let sources = source_files();
    assert_eq!(
        installed.keys().collect::<Vec<_>>(),
        sources.keys().collect::<Vec<_>>(),
        "each function in the database has a source file, and no file is left over"
    );
    for (name, source) in &sources {
        assert_eq!(
            &installed[name], source,
            "{name}: the migrations and src/store/postgres/functions/{name}.sql differ"
        );
    }
}

#[test]
fn a_declaration_reads_its_parameters_and_body() {
    let source = "-- header (a comment may say $ once)\n\
                  CREATE OR REPLACE FUNCTION f(\n    a  uuid,\n    b integer\n) RETURNS int\n\
                  LANGUAGE plpgsql AS $$\nBEGIN RETURN 1; END\n$$;\n";
    assert_eq!(
        declared(source, "f"),
        Declared {
            arguments: "a uuid, b integer".into(),
            body: "\nBEGIN RETURN 1; END\n".into(),
            settings: vec![],
        }
    );
    let with_settings = source.replace(
        "LANGUAGE plpgsql AS",
        "LANGUAGE plpgsql\nSET jit = off\nSET plan_cache_mode = force_generic_plan\nAS",
    );
    assert_eq!(
        declared(&with_settings, "f").settings,
        ["jit=off", "plan_cache_mode=force_generic_plan"]
    );
}
