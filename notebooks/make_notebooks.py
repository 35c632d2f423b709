#!/usr/bin/env python3
"""Write the notebooks of this folder (without outputs) from the cell lists below.

    python3 notebooks/make_notebooks.py          # rewrite every notebook
    python3 notebooks/make_notebooks.py --check  # exit 1 if a notebook differs from this file

Edit the notebooks HERE, not in Jupyter (or copy the change back here), so that they stay
consistent: every notebook opens with the same profile cell and ends with the sentinel cell
that environment/run-notebooks.py requires. Code cells stay short; logic belongs in
src/notebook.rs (`overopt::notebook`).

Figures come from `overopt::plots` (each builder returns a `Figure` whose `evcxr_display`
emits one text/html block with plotly.js embedded). When the crate has no `plots` module yet,
the figure cells are left out, a note says so, and the notebook's metadata tells the runner
not to expect figures; rerun this script once `plots` has landed.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLOTS = re.search(r"^pub mod plots;", (ROOT / "src" / "lib.rs").read_text(), re.M) is not None

KERNELSPEC = {"name": "overopt-rust", "display_name": "Rust (overopt)", "language": "rust"}
LANGUAGE_INFO = {
    "name": "Rust",
    "file_extension": ".rs",
    "mimetype": "text/rust",
    "codemirror_mode": "rust",
    "pygment_lexer": "rust",
    "version": "",
}


def md(text):
    return ("markdown", text.strip("\n"))


def code(text):
    return ("code", text.strip("\n"))


def figure(text):
    """A figure cell: kept when overopt::plots exists."""
    return ("figure", text.strip("\n"))


NO_PLOTS_NOTE = md("""
*Figures:* this copy of the notebook was generated before `overopt::plots` existed, so its
figure cells are left out; the tables below carry the same numbers. Regenerate with
`python3 notebooks/make_notebooks.py` once the crate has `overopt::plots`.
""")


def profile_cell(default="teach", describe="describe"):
    return code(f"""
// The scale this notebook runs: "teach" (synthetic task, CPU, minutes) or "paper" (reads
// paper-scale results; training them needs CUDA GPUs, the hub and a judge endpoint).
// OVEROPT_NOTEBOOK_PROFILE / OVEROPT_SCALE in the environment take precedence.
use overopt::notebook;
let p = notebook::profile_for("{default}")?;
p.{describe}()
""")


def sentinel(name):
    return code(f'notebook::done("{name}");')


SCALE_MD = """
**Scale.** Results are read from the profile's results directory when the runs are there
and trained otherwise; training cells print their progress as they go. The whole teach grid
(3 sizes x 3 objectives x 7 betas, plus R-DPO) takes about 4 minutes on a 2-core machine
(215 s for one uninterrupted run on the project's development machine; docs/teach_sweep.md):
run `bash environment/reproduce.sh` once (it fills `out/teach`, which the notebooks then
read) rather than training it from here. The quickstart trains only the slice it shows.
"""

NOTEBOOKS = {}

NOTEBOOKS["00_quickstart"] = dict(
    section="tour",
    trains=True,
    cells=[
        md("""
# Quickstart: the whole pipeline on one small configuration

This crate reproduces *Scaling Laws for Reward Model Overoptimization in Direct Alignment
Algorithms* (Rafailov et al., 2024) in Rust on [candle](https://github.com/huggingface/candle).
The pipeline of the paper, and of this notebook:

1. a base language model is fine-tuned on reference summaries (**SFT**);
2. pairs of its own samples are labelled by a preference labeler (**preference pairs**);
3. a direct alignment algorithm (**DAA**: DPO, IPO or SLiC) trains the SFT model on the pairs
   at several values of beta, with the SFT model as the frozen reference; checkpoints at 25,
   50, 75 and 100% of the epoch;
4. every checkpoint is **evaluated**: KL to the reference on its own samples, win rate against
   the reference summaries under the gold judge, held-out DAA loss, implicit-reward accuracy;
5. the **analysis** fits scaling laws and checks the paper's claims C1-C9.

At *teach* scale the task is synthetic (posts of fact tokens, a gold reward known exactly, a
labeler with a verbosity bias the gold reward does not share) and the models are three tiny
GPT-NeoX networks, so everything runs on a CPU with no download. The other notebooks take the
paper section by section: `01_overoptimization` (3.1), `02_scaling_laws` (3.2), `03_length`
(3.3), `04_reward_metrics` (3.4), `05_likelihoods` (3.5), `06_toy_mdp` (section 4).
"""),
        md("""
## The configuration

`overopt::notebook` is the notebooks' facade: it picks the configuration, loads or trains
results, and renders tables. The test suite runs every notebook with the tiny *smoke* profile.
"""),
        profile_cell(),
        md("""
## The task

Each prompt is a "post" of fact and filler tokens; a good summary names the post's three most
important facts and stops. The gold reward scores coverage and penalises hallucinated,
repeated and surplus tokens. Reference summaries are deliberately noisy (extra tokens, a
swapped or dropped fact), so a policy can beat them.
"""),
        code("notebook::task_examples(&p, 4)?"),
        md("""
## Train one slice of the grid

The SFT models, the preference pairs, and DPO at every beta for one model size (the size
whose samples made the pairs). Everything lands in the profile's results directory, where
the other notebooks find it. Each stage prints a line when it finishes.
"""),
        code("""
let size = p.teach.as_ref().map(|c| c.pairs.source_size.clone()).unwrap_or_default();
let part = notebook::load_or_run_subset(&p, "dpo", &size)?;
println!("{}", part.summary());
"""),
        code("notebook::pair_examples(&p, 4)?"),
        md("""
## The results table

One row per evaluated policy: objective, beta, size, checkpoint (fraction of the epoch), KL
to the reference, win rate with its 95% interval, mean length, held-out DAA metrics. It is
written as `results.parquet` / `results.csv`; here it is a polars `DataFrame`.
"""),
        code("""
let df: notebook::DataFrame = part.frame()?;
println!("{} rows x {} columns", df.height(), df.width());
println!("{}", df.head(Some(6)));
"""),
        code("notebook::end_of_epoch_table(&part)"),
        figure("overopt::plots::fig1_end_of_epoch(&part.rows)"),
        md("""
## The crate underneath

The facade only strings the crate's modules together. For example the three losses of
`overopt::train::loss` on one pair, as a function of the margin
h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], at beta = 0.1:
"""),
        code("""
use overopt::train::loss::{Objective, pair_loss};
let margins = [-5.0, 0.0, 5.0, 10.0, 20.0];
println!("h:    {}", margins.map(|h| format!("{h:>7}")).join(""));
for name in ["dpo", "ipo", "slic"] {
    let o = Objective::from_name(name, 0.0)?;
    let l = margins.map(|h| format!("{:>7.3}", pair_loss(o, 0.1, h, 0.0, 0.0)));
    println!("{name:<5} {}", l.join(""));
}
println!("(beta = 0.1; IPO in the form of the DPO reference code)");
"""),
        md("""
IPO's loss is smallest at h = 1/(2 beta) = 5 and grows beyond it: it asks for a fixed
margin, where DPO keeps rewarding a larger one. That is why IPO reaches lower KL at the same
beta (claim C3, notebook 01).

The claim verdicts read the same rows. With one objective and one size most claims cannot be
judged (they compare objectives or sizes): they say *not evaluated* rather than guess.
"""),
        code("""
let verdicts = notebook::claims(&part, &[]);
notebook::verdicts_md(&verdicts, &["C1", "C2", "C5"])
"""),
        sentinel("00_quickstart"),
    ],
)

NOTEBOOKS["01_overoptimization"] = dict(
    section="3.1",
    trains=True,
    cells=[
        md("""
# Section 3.1: over-optimization in direct alignment algorithms (Figs. 1, 2, Appendix C)

**What the paper claims.** Trained with DPO, IPO or SLiC at seven betas on TL;DR, Pythia
1B / 2.8B / 6.9B policies improve in GPT-4 win rate as they move away from the SFT policy and
then get worse again: plotted against d = sqrt(KL(pi || pi_ref)), win rate is hump-shaped
(**C1**). Within one epoch, runs with a wide KL budget (small beta) are best after 25% of the
data and decline while their KL keeps growing (**C2**). IPO reaches lower KL at the same beta
and over-optimizes less (**C3**). The smallest model reaches higher KL under the same beta,
over-optimizes almost at once, and larger models trade KL for win rate better (**C4**).
"""),
        profile_cell(),
        md(SCALE_MD),
        code("""
let res = notebook::load_or_run(&p)?;
println!("{}", res.summary());
"""),
        md("""
## Fig. 1, row 1: end of the epoch

Win rate against sqrt(KL), one point per beta, per objective (panel) and model size (colour);
the SFT policy sits at d = 0.
"""),
        figure("overopt::plots::fig1_end_of_epoch(&res.rows)"),
        code("notebook::end_of_epoch_table(&res)"),
        md("""
## Fig. 1, row 2: with the intermediate checkpoints

The same with the checkpoints at 25, 50 and 75% of the epoch added.
"""),
        figure("overopt::plots::fig1_checkpoints(&res.rows)"),
        md("""
## Fig. 2 and Appendix C: intra-epoch dynamics

Win rate and sqrt(KL) at each checkpoint for every beta. Each entry of the table is
`win rate (sqrt KL)`.
"""),
        figure("""
let sizes = res.sizes();
let largest = sizes.last().cloned().unwrap_or_default();
overopt::plots::fig2_intra_epoch(&res.rows, &largest)
"""),
        code("notebook::intra_epoch_table(&res)"),
        md("## Verdicts"),
        code("""
let verdicts = notebook::claims(&res, &[]);
notebook::verdicts_md(&verdicts, &["C1", "C2", "C3", "C4"])
"""),
        code('println!("{}", notebook::verdict_text(&verdicts, "C1"));'),
        md("""
## Where teach scale departs from the paper

The teach task replaces GPT-4 with an exact gold reward, TL;DR with synthetic posts, and
Pythia with networks of 30k to 600k parameters trained in minutes; the grid has seven betas,
like the paper's, but over three decades (0.003 to 3). What over-optimization means is the same: the DAA exploits a bias of the
preference labeler (longer is better) that the gold reward does not share, so beyond some KL
the win rate falls, together with longer outputs. The model-size effect is the most fragile
part: in the prototype that designed the task, a fixed learning rate let the LARGER models
reach higher KL, the opposite of the paper, and scaling the rate with 1/width reversed it
(`daa.lr_inverse_width`), so C4's verdict depends on that convention.

The full teach grid committed in artifact/expected/teach (three sizes; docs/teach_sweep.md)
shows the hump for all three objectives on `medium` and `large`, so C1 holds (DPO, large:
0.350 at SFT, 0.514 at sqrt(KL) 0.65, 0.439 at 1.20; IPO, large: peak 0.508 at 0.58, 0.443 at
1.15), but not on `small`, where every objective rises to about 0.378 and then falls by at
most 0.006 (the small model goes no further than sqrt(KL) of about 1.0, however small the
beta). IPO keeps the lowest KL at every beta on every size, but C3 fails (0 of 3 sizes): its
over-optimization is smaller than DPO's and SLiC's on `medium` and `large` only by 0.005 to
0.011 (DPO / IPO / SLiC: 0.069 / 0.064 / 0.072 and 0.075 / 0.064 / 0.069), well within the
noise of the win rates (the rule asks for about 0.063), and on `small` nothing falls. C2
fails in all 9 cells: at the widest budgets the best checkpoint is never the 25% one; it is
the 50% one on `small` and the 75% one on `medium` and `large` (DPO, small, beta 0.003: 0.343
at 25% with KL 0.17, 0.391 at 50%, 0.376 at the end with KL 1.01; DPO, medium, beta 0.003:
0.392 at 25%, 0.406 at 75%, 0.371 at the end). C4 fails: the larger models win more (best
DAA 0.378 / 0.440 / 0.514 for small / medium / large), but with one learning rate for every
width the small model does not reach higher KL. At the smallest betas the KL a run reaches depends on its
SFT model: tables of this configuration made from different SFT draws differ there by up to
a factor of two (docs/teach_sweep.md, "Run to run"). The verdicts above are computed from
this run's numbers with the rules of docs/claims.md; nothing is tuned towards them.
"""),
        code('notebook::scale_note(&p, &verdicts, &["C1", "C2", "C3", "C4"])'),
        sentinel("01_overoptimization"),
    ],
)

NOTEBOOKS["02_scaling_laws"] = dict(
    section="3.2",
    cells=[
        md("""
# Section 3.2: scaling-law fits

**What the paper claims.** Gao et al. (2023) found that in RLHF the gold reward of a policy
follows R(d) = d (alpha - beta log d) in d = sqrt(KL). The paper fits the same form to DAA win
rates: it fits with about half the RMSE of a quadratic in KL, while a quadratic in d fits
about as well as R(d) (**C5**).

R(0) = 0, whereas the SFT policy already wins some comparisons, so here every form is fitted
to the **gain** in win rate over the SFT policy of the same size (as Gao et al. recentre their
reward so that the initial policy scores 0). Three two-coefficient fits through the origin:
R(d) = d(alpha - b ln d), a KL + c KL^2 and a d + c d^2; every checkpoint is a point.
"""),
        profile_cell(),
        md(SCALE_MD),
        code("""
let res = notebook::load_or_run(&p)?;
println!("{}", res.summary());
"""),
        code("""
let groups = notebook::fit_groups(&res);
notebook::fit_table_md(&groups)
"""),
        md("""
`*` pools sizes (or objectives). "R / quad KL" is claim C5's first ratio (the paper: about
0.5), "quad d / R" its second (the paper: about 1). The peak d = exp(alpha/b - 1) is where the
fitted R(d) turns over.
"""),
        figure("overopt::plots::fit_overlays(&res.rows, &groups)"),
        md("## Verdict"),
        code("""
let verdicts = notebook::claims(&res, &[]);
notebook::verdicts_md(&verdicts, &["C5"])
"""),
        md("""
## Where teach scale departs from the paper

The paper does not say whether its quadratics have an intercept, nor whether it fitted win
rates or gains; fitting gains is our choice (the forms with an intercept are in the fit table
the crate writes, `fits.csv`, but are not judged). The teach grid has seven betas and four
checkpoints per (objective, size), 28 points per fit, against the paper's 7 x 5; with fewer
points the RMSE ratios are noisier, and a fit whose gain never turns over (no
over-optimization in that cell) favours whichever form bends least. The prototype of the task
found R(d) ahead of both quadratics in every size, in and out of sample. On the full teach
grid (docs/teach_sweep.md) R(d) beats the quadratic in KL in 8 of 9 curves (DPO, medium: RMSE
0.015 against 0.036; the exception is IPO on `small`, ratio 0.78 against the rule's 0.75),
while the quadratic in d fits about as well as R(d) in all 9 (0.016 for DPO, medium).
"""),
        code('notebook::scale_note(&p, &verdicts, &["C5"])'),
        sentinel("02_scaling_laws"),
    ],
)

NOTEBOOKS["03_length"] = dict(
    section="3.3",
    cells=[
        md("""
# Section 3.3: length (Fig. 3)

**What the paper claims.** DPO is known to amplify the verbosity bias of preference data.
*Left:* length-regularized DPO (R-DPO, a length margin inside the sigmoid) still
over-optimizes; it wins more on a length-corrected basis but trails standard DPO at small KL
budgets. *Right:* regressing the implicit reward log(pi/pi_ref)(y|x) on the length |y| over
the policy's own samples, the R^2 is higher for smaller models and for smaller KL budgets
(larger beta) (**C6**): under limited capacity, the model leans on the simplest feature.
"""),
        profile_cell(),
        md(SCALE_MD),
        code("""
let res = notebook::load_or_run(&p)?;
println!("{}", res.summary());
"""),
        md("## Fig. 3 left: standard vs length-regularized DPO"),
        figure("""
let rdpo_size = p.teach.as_ref().and_then(|c| c.rdpo.as_ref()).map(|r| r.size.clone());
overopt::plots::fig3_rdpo(&res.rows, rdpo_size.as_deref().unwrap_or("2.8b"))
"""),
        code("notebook::rdpo_table(&res)"),
        md("""
## Fig. 3 right: R^2 of the implicit reward on length

One regression per (objective, size, beta, checkpoint) over held-out policy samples, with an
intercept (centred R^2). The table averages DPO, IPO and SLiC.
"""),
        code("""
let fits = notebook::length_fit_rows(&res);
println!("{} regressions over {} samples", fits.len(), res.samples.len());
notebook::length_r2_table(&res, &fits)
"""),
        figure("overopt::plots::fig3_length_r2(&fits)"),
        md("## Verdict"),
        code("""
let verdicts = notebook::claims(&res, &[]);
notebook::verdicts_md(&verdicts, &["C6"])
"""),
        md("""
## Where teach scale departs from the paper

The labeler of the teach task prefers longer summaries (labeler reward = gold + 0.2 x length
+ noise), so length is THE exploitable feature by construction, and samples are at most ten
tokens long. The paper's "length-corrected win rate" is not defined there; the crate's
stand-in (`analysis::length::length_controlled_win_rate`) reads a logistic regression of the
outcome on the length difference at zero difference. The prototype of the task found C6's
budget effect reversed (R^2 grew as beta shrank) and R^2 growing with size. The full teach
grid (docs/teach_sweep.md) shows much the same: the R^2 of implicit reward on length is higher
for the small model than for the large one in 8 of 84 comparisons (median R^2 small 0.010,
medium 0.124, large 0.051), and it rises with beta (a smaller KL budget) in 2 of 36 groups,
falling in 33. So C6 fails there; the next cell reports what this run shows.
"""),
        code('notebook::scale_note(&p, &verdicts, &["C6"])'),
        sentinel("03_length"),
    ],
)

NOTEBOOKS["04_reward_metrics"] = dict(
    section="3.4",
    cells=[
        md("""
# Section 3.4: do the DAA's own metrics predict the win rate? (Fig. 4)

**What the paper claims.** Reward models are usually judged by ranking accuracy on held-out
preferences. For DAAs, the implicit reward's held-out accuracy and the held-out DAA loss show
little or no relation to the policy's win rate within a model size (**C7**); IPO's weak
positive relation pooled over sizes comes from the model size alone.
"""),
        profile_cell(),
        md(SCALE_MD),
        code("""
let res = notebook::load_or_run(&p)?;
println!("{}", res.summary());
"""),
        figure("overopt::plots::fig4_metrics(&res.rows)"),
        code("""
let cors = notebook::metric_rows(&res);
notebook::metric_table(&cors, &notebook::FIG4_METRICS)
"""),
        md("""
Spearman's rho with a 95% bootstrap interval over the rows of each group (every beta,
checkpoint and seed); `*` pools. A metric "predicts" win rate when |rho| >= 0.5 and its
interval excludes 0.
"""),
        md("## Verdict"),
        code("""
let verdicts = notebook::claims(&res, &[]);
notebook::verdicts_md(&verdicts, &["C7"])
"""),
        md("""
## Where teach scale departs from the paper

The held-out pairs are the biased labeler's, like the training pairs, so accuracy measures
agreement with the labeler, not with the gold reward; that is also true of the paper's human
labels. Each (objective, size) cell has 28 points (7 betas x 4 checkpoints) from one seed, so
a correlation needs to be strong to clear the bootstrap interval. On the full teach grid
(docs/teach_sweep.md) C7 fails: it holds in 4 of 9 cells, DPO and SLiC on `medium` and
`large`, where neither metric reaches |rho| 0.5 (DPO, medium: accuracy Spearman 0.454 [0.106,
0.783], held-out loss -0.373 [-0.716, -0.034]). In the other 5 cells a metric does predict the
win rate. On `small`, accuracy does so with a negative sign and the held-out loss with a
positive one (DPO, small: accuracy -0.791 [-0.906, -0.584], loss 0.724 [0.435, 0.872]). For
IPO on `medium` and `large` accuracy predicts with a positive sign (large: 0.627 [0.280,
0.850]), and for IPO on `small` the held-out loss does (0.862). A positive link is plausible
on this task: the labeler and the gold reward agree on most pairs (the chosen response had the
higher gold reward in 82% of them in the task's prototype; `data/pair_stats.json` in the
results directory has this run's figure), so fitting the labeler better also helps on the
gold reward until length takes over.
"""),
        code('notebook::scale_note(&p, &verdicts, &["C7"])'),
        sentinel("04_reward_metrics"),
    ],
)

NOTEBOOKS["05_likelihoods"] = dict(
    section="3.5",
    cells=[
        md("""
# Section 3.5: decreasing likelihoods (Fig. 5)

**What the paper claims.** During DAA training the implicit reward of the *preferred*
responses falls too, which looks wrong. On held-out preferred responses, E[r(x, y_w)] is
approximately minus the forward KL(pi_ref || pi), so its decline is the policy moving away
from the reference. Plotting win rate against sqrt(-E[r(x, y_w)]) gives the same hump as
against sqrt(KL) (**C8**): falling likelihoods are not, by themselves, the problem.
"""),
        profile_cell(),
        md(SCALE_MD),
        code("""
let res = notebook::load_or_run(&p)?;
println!("{}", res.summary());
"""),
        figure("overopt::plots::fig5_likelihood(&res.rows)"),
        code("notebook::likelihood_table(&res)"),
        code("""
let cors = notebook::metric_rows(&res);
notebook::metric_table(&cors, &notebook::FIG5_METRICS)
"""),
        md("""
When E[r] > 0 the signed root -sqrt(E[r]) is used, which keeps the order and puts such a
policy to the left of the SFT policy.

**Which quantity is on the axis?** The claim as specified uses the implicit reward
r = beta log(pi/pi_ref). The paper's argument, though, is about the log-ratio itself:
E[log pi/pi_ref (y_w)] ~ -KL(pi_ref || pi). Across betas the two differ by the factor beta, so
a small-beta run that moved far from the reference can sit close to the SFT policy on the
first axis. The same figure with the log-ratio (r / beta) on the axis:
"""),
        figure("overopt::plots::fig5_likelihood_without_beta(&res.rows)"),
        md("## Verdict"),
        code("""
let verdicts = notebook::claims(&res, &[]);
notebook::verdicts_md(&verdicts, &["C8"])
"""),
        md("""
## Where teach scale departs from the paper

The approximation E[r(x, y_w)] ~ -KL(pi_ref || pi) needs the SFT model to have been trained
on the preferred responses. Here the SFT data are reference summaries and the preference
pairs are the SFT model's own samples, so the approximation holds only roughly. The x axis
is still a divergence from the reference, measured on held-out data instead of on policy
samples. On the full teach grid (docs/teach_sweep.md) the hump in sqrt(-E[r_w]) holds only
for SLiC on `large` (peak 0.509 at 0.34, 0.057 lower at 0.37), so C8 fails. For IPO the best
win rate sits at the high end of that axis at every size, and so does DPO's on `large`, so
nothing falls after it. For DPO and SLiC on `small` and `medium` the win rate past the peak
falls by 0.011 or less, inside the rule's margin of about 0.04.

With the log-ratio on the axis instead (the verdict's `without_beta` variant, reported but not
judged), the points line up as they do against sqrt(KL) (over the 63 end-of-epoch DAA runs,
Spearman 0.96 between this axis and sqrt(KL), against 0.42 with beta), and the hump holds in 5 of 9
cells: IPO and SLiC on `medium` and `large`, DPO on `large` only. That variant fails too, on
DPO, so at teach scale the conclusion does not depend on the choice of axis.
"""),
        code('notebook::scale_note(&p, &verdicts, &["C8"])'),
        sentinel("05_likelihoods"),
    ],
)

NOTEBOOKS["06_toy_mdp"] = dict(
    section="4",
    cells=[
        md("""
# Section 4 and Appendices D, E: reward exploitation in a toy MDP

**What the paper claims.** DAAs fit an implicit reward to finitely many preferences, and the
objective leaves most of the response space unconstrained: many optima exist, and some put
much probability on responses no data ever showed. A tree MDP makes it exact: one start state,
three actions, depth three (27 trajectories); a recurrent policy behaviour-cloned on three
demonstrations (a0,a0,a0), (a1,a1,a0), (a2,a2,a2); one preference (a1,a1,a0) > (a0,a0,a0);
DPO, IPO and SLiC at beta 0.01, 0.1 and 0.5. Every DAA moves substantial probability onto
trajectories never seen, and for DPO where it goes differs from run to run (**C9**).
Appendix D reads the logits as soft Q-values: beta * logsumexp(Q/beta) tends to max Q as
beta shrinks, so the value of a state bootstraps from its best action, seen or not.

Nothing here depends on the scale: the toy runs in seconds and is recomputed every time (the
smoke profile uses fewer seeds and steps).
"""),
        profile_cell(describe="describe_toy"),
        code("""
let toy = notebook::toy_mdp(&p)?;
println!("{} SFT runs, {} DAA runs, {} parameters, {:.1} s",
    toy.sft.len(), toy.runs.len(), toy.num_params, toy.wall_seconds);
"""),
        md("""
## Figs. 6-7, 9-18: where the probability goes

Mass on the preferred, the dispreferred, the third demonstration and the 24 out-of-distribution
(OOD) trajectories at the end of training, median [min, max] over seeds, and the largest OOD
mass at any step.
"""),
        code("notebook::toy_cells_table(&toy)"),
        figure("""
let figs = overopt::plots::toy_mdp_figures(&toy);
println!("{}", figs.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "));
notebook::pick(&figs, "toy_mass_dpo")?
"""),
        md("""
Each DPO seed separately: where the runs end differs from seed to seed (the second half of
C9).
"""),
        figure('notebook::pick(&figs, "toy_dpo_seeds")?'),
        figure('notebook::pick(&figs, "toy_end_mass")?'),
        figure('notebook::pick(&figs, "toy_ood_trajectories")?'),
        md("## Appendix D: soft values"),
        code("notebook::appendix_d_table(&toy)"),
        figure('notebook::pick(&figs, "toy_appendix_d")?'),
        md("## Verdict"),
        code("notebook::toy_c9_md(&toy)"),
        code("""
let toy_rows = notebook::toy_summaries(&toy);
let verdicts = notebook::claims(&notebook::Results::default(), &toy_rows);
notebook::verdicts_md(&verdicts, &["C9"])
"""),
        md("""
Two rules judge C9: the toy module's own (median OOD mass per objective, docs/toy_mdp.md) and
the analysis module's (a quarter of an objective's runs gain >= 0.1 OOD mass,
docs/claims.md). Both are shown.

## Where this departs from the paper

The paper gives no optimizer, learning rate, step count or network size for the toy. With the
settings fixed here before looking at the outcome (RMSProp, lr 1e-2, 100 SFT and 500 DAA
steps, a GRU of 1331 parameters), the typical end state puts nearly all mass on the preferred
trajectory: substantial OOD mass appears only in some seeds or transiently in the first steps
(the optimizer's first update is large). The second half of C9 reproduces only at beta 0.5:
there the DPO seeds end in very different places (the preferred mass ranges over 0.51 across
the 8 seeds, the OOD mass over 0.22), including mass on the third demonstration the
preference never mentions. At beta 0.01 and 0.1 the seeds agree to within 0.09. The toy
module's rule asks for a spread at some beta, so it counts this as reproduced; the analysis
rule (b) asks for half of the betas, so there it fails. docs/toy_mdp.md has a sensitivity
table over these settings.
"""),
        code('notebook::scale_note(&p, &verdicts, &["C9"])'),
        sentinel("06_toy_mdp"),
    ],
)


# The runner's self-test fixture (environment/run-notebooks.py --self-test): every problem the
# runner must catch, one per cell; expect_problems lists them all.
FIXTURE = dict(
    section="fixture",
    # (problem, cell index): the runner must report each of these; -1 is the whole notebook.
    expect_problems=[["error-output", 2], ["panic", 3], ["question-mark-error", 4],
                     ["stderr", 5], ["missing-sentinel", 6], ["missing-figure", -1]],
    cells=[
        md("""
# Deliberately broken (test fixture)

`environment/run-notebooks.py --self-test` runs this notebook and passes only when it reports
every problem planted below, each at its cell. evcxr reports a panic or an error returned
through `?` as a successful cell, so only the runner's checks of the outputs catch them.
"""),
        code("""
use overopt::notebook;
println!("this cell is fine");
"""),
        code("// error-output: a compile error\nlet x: u32 = \"not a number\";"),
        code("// panic\nlet v: Vec<u32> = Vec::new();\nprintln!(\"{}\", v[3]);"),
        code("// question-mark-error: a facade error through `?`\nnotebook::Scale::from_name(\"huge\")?;"),
        code("// stderr: a plain error through `?` (evcxr prints only its message)\nlet n: u32 = \"x\".parse()?;"),
        code("// missing-sentinel: the wrong name\nnotebook::done(\"not-broken\");"),
    ],
)


def build(name, spec):
    cells = []
    skipped = 0
    for kind, text in spec["cells"]:
        if kind == "figure":
            if not PLOTS:
                skipped += 1
                continue
            kind = "code"
        cell = {"cell_type": kind, "id": f"{name[:2]}-{len(cells):02d}", "metadata": {},
                "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        cells.append(cell)
    if skipped:
        note = {"cell_type": "markdown", "id": f"{name[:2]}-plots-note", "metadata": {},
                "source": NO_PLOTS_NOTE[1].splitlines(keepends=True)}
        cells.insert(1, note)
    has_figures = PLOTS and any(k == "figure" for k, _ in spec["cells"])
    meta = {"section": spec["section"], "expect_figures": has_figures}
    if spec.get("trains"):
        # The runner runs these first, one at a time: they write the results directory.
        meta["trains"] = True
    if "expect_problems" in spec:
        # The fixture: a figure is expected and never shown.
        meta = {"section": spec["section"], "expect_figures": True,
                "expect_problems": spec["expect_problems"]}
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": KERNELSPEC,
            "language_info": LANGUAGE_INFO,
            "overopt": meta,
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(nb):
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    targets = [(HERE / f"{name}.ipynb", name, spec) for name, spec in NOTEBOOKS.items()]
    targets.append((ROOT / "tests" / "fixtures" / "notebooks" / "broken.ipynb", "broken",
                    FIXTURE))
    for path, name, spec in targets:
        text = render(build(name, spec))
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check:
        if stale:
            print("make_notebooks: out of date: " + ", ".join(stale)
                  + " (run python3 notebooks/make_notebooks.py)", file=sys.stderr)
            return 1
        print(f"make_notebooks: {len(NOTEBOOKS)} notebooks up to date"
              f" (figures {'on' if PLOTS else 'off: no overopt::plots yet'})")
        return 0
    print(f"make_notebooks: wrote {len(NOTEBOOKS)} notebooks"
          f" (figures {'on' if PLOTS else 'off: no overopt::plots yet'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
