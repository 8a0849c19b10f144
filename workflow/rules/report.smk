# Report: freeze MLflow runs into a CSV, then build tables (Markdown, LaTeX, CSV), plots and sample grids under
# reports/; each is registered (with a caption from workflow/report/) for `snakemake --report report.html`.


rule export_runs:
    input:
        all_evaluations,
        lambda wc: [rdpo_table(b, n) for b in BACKBONES for n in rdpo_nfes(b)],
    output:
        runs=f"{STUDY_DIR}/runs.csv",
        history=f"{STUDY_DIR}/runs_history.csv",
    log:
        f"logs/report/{STUDY}_export.log",
    benchmark:
        f"benchmarks/snakemake/report/{STUDY}_export.tsv"
    message:
        "Exporting MLflow runs"
    conda:
        "../../environment.yml"
    shell:
        "epd report --export-only --runs-csv {output.runs} > {log} 2>&1"


rule expected_rows:
    output:
        f"{STUDY_DIR}/expected_rows.json",
    params:
        rows=lambda wc: digest(expected_rows()),
    log:
        f"logs/report/{STUDY}_expected_rows.log",
    conda:
        "../../environment.yml"
    run:
        Path(output[0]).write_text(json.dumps(expected_rows(), indent=1))


rule report:
    input:
        runs=f"{STUDY_DIR}/runs.csv",
        expected=f"{STUDY_DIR}/expected_rows.json",
    output:
        index=report("reports/README.md", caption="../report/index.rst", category="Report"),
        tables=[report(f"reports/{b}/table.md", caption="../report/table.rst", category=b, subcategory="Tables",
                       labels={"backbone": b, "file": "table.md"}) for b in BACKBONES],
        plots=[report(f"reports/{b}/{name}", caption=f"../report/{name[:-4]}.rst", category=b, subcategory="Plots",
                      labels={"backbone": b, "plot": name[:-4]}) for b in BACKBONES for name in report_plots(b)],
        grids=[report(f"reports/{b}/{name}", caption="../report/grid.rst", category=b, subcategory="Samples",
                      labels={"backbone": b, "grid": name[:-4]}) for b in BACKBONES for name in report_grids(b)],
    params:
        external=" ".join(f"--external {e}" for e in config["report"]["external"]),
        backbones=",".join(BACKBONES),
        config_file=RESOLVED_CONFIG,
    log:
        f"logs/report/{STUDY}_build.log",
    benchmark:
        f"benchmarks/snakemake/report/{STUDY}_build.tsv"
    message:
        "Building tables, plots and sample grids"
    conda:
        "../../environment.yml"
    shell:
        "epd report --build-only --runs-csv {input.runs} --out reports --backbones {params.backbones} "
        "{params.external} --config {params.config_file} --expect-rows {input.expected} > {log} 2>&1"
