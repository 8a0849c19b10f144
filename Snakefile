# epd: one command reproduces the study for every backbone in the config (default: the embedded digits model).
#   snakemake --cores all                                   # configs/default.yaml
#   snakemake --cores all --configfile configs/smoke.yaml   # the CI-sized study
# --configfile replaces the default instead of being merged over it
if not workflow.overwrite_configfiles:

    configfile: "configs/default.yaml"



report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/backbone.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/peers.smk"
include: "workflow/rules/rdpo.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
