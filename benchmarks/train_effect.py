"""Does TFP help? Train the same model on the same tokens under several packings and compare what it learned.

Every condition trains a model from the same initialisation (per seed) on the same training samples, for the
same number of optimizer steps, with the same optimizer, learning-rate schedule and batch size in tokens; the
conditions differ only in how the samples are ordered and packed and in what attention sees:

=================  =======  ==========  =====================================================================
condition          order    attention   what it is
=================  =======  ==========  =====================================================================
``random+pack``    random   pack        random packing, causal attention over the whole pack (the paper's
                                        baseline)
``tfp+pack``       TFP      pack        TFP order, causal attention over the whole pack: later samples see
                                        earlier, related ones (the paper's method)
``random+sample``  random   sample      one attention segment per sample (what transformers'
                                        ``DataCollatorWithFlattening`` does)
``tfp+sample``     TFP      sample      TFP order, but no attention across samples
=================  =======  ==========  =====================================================================

All four pack with ``next_fit`` (the package's order-keeping strategy: a new pack when the next sample does
not fit, no sample split), so only the order and the attention differ. When the package's default packing
strategy (``pack_gpu``'s ``strategy``) is another one, ``tfp+pack/<strategy>`` is added. ``--conditions``
takes any list of ``ORDER:ATTENTION[:STRATEGY]`` (e.g. ``tfp:pack:stream``, the paper's own packer, which
splits samples at pack boundaries).

How a run goes (one task, one condition, one seed):

1. the training samples are tokenized once (labels: the response tokens only, as ``tfp-pack`` does);
   ``order="tfp"`` orders them by :func:`tfp_kernels.tfp_order` over the embeddings of their instruction
   (default embedder: the package's hashed byte n-gram bag; threshold: the 2% quantile of pair distances,
   window 4, no cap: the package's defaults), once per task; ``order="random"`` uses a permutation drawn
   from the seed. :func:`tfp_kernels.pack_gpu` makes the packs.
2. ``--epochs`` epochs; before each the packs are shuffled (:func:`tfp_kernels.shuffle_packs` with the seed
   and the epoch; the order inside a pack is kept). The concatenated epochs are cut into ``--steps`` batches
   of consecutive packs holding about the same number of tokens (so every condition sees every sample
   ``--epochs`` times, in the same number of steps, with batches of the same size in tokens up to one pack).
3. each batch is assembled by :func:`tfp_kernels.assemble` in the flat ``[1, T]`` layout with ``cu_seqlens``
   (one segment per pack or per sample) and fed to the model with ``PackedBatch.to_hf_kwargs()``; attention
   runs through :func:`tfp_kernels.varlen_attention`, registered as a transformers attention function, so that
   the segments of ``cu_seqlens`` are exactly what attention sees, on the CPU as on a GPU.
4. AdamW (lr ``--lr``, betas (0.9, 0.95), weight decay 0.01), linear warm-up over 10% of the steps then
   cosine decay to 10% of ``--lr``, gradients clipped at norm 1; loss: mean cross-entropy over the batch's
   response tokens.
5. the seed sets the model's initialisation, the random order and the pack shuffles; the same seed gives the
   same initialisation in every condition (so TFP and random are compared per seed, paired).

Tasks of the default run (CPU, nothing downloaded; the model is a tiny Llama, ``transformers.LlamaConfig``,
trained from scratch, over the package's byte tokenizer: 259 token ids):

``sft``
    the bundled default SFT set (``tfp_kernels/data/sft_default.jsonl.gz``: 4,000 synthetic Alpaca records on
    8 topics, 5% planted near-duplicates), split by record with a fixed seed into training and held-out records
    (a subset of each, ``--sft-train`` / ``--sft-eval``, to fit the time budget). Metrics on the held-out
    records: ``heldout_loss`` (below) and ``first_line_exact``: the fraction of held-out records whose first
    response line (the fact or the computed result: a capital, a unit conversion, a weekday, ``a + b = c``,
    the corrected sentence, ...; the later lines of the bundled answers are filler drawn at random) is
    reproduced exactly by greedy decoding, with its end (the newline, or the end-of-sequence token of a
    one-line answer).

``families``
    a task built so that related context *can* help (written here before any result was seen, and not
    changed after). Families of questions share a hidden rule: family ``f`` has an invented name (e.g.
    ``"tavoru"``), a key of 3 random letters and a side (prefix or suffix). Every question of the family reads
    ``"Apply the <name> code to: <word>"`` for a random word of 4-6 letters, and its answer is the word with
    the key glued on that side (``key + word`` or ``word + key``). A model can answer from its weights (it
    has learnt the family's key and side) or from context (a solved example of the same family earlier in
    the same attention segment shows the key and the side: copying them is enough). 24 families are
    trained on, 40 questions each; 24 is few enough that same-family pairs (1/24 of all pairs) lie well
    inside TFP's 2% distance quantile, so TFP *can* put family members next to each other (with many more,
    smaller families, TFP's threshold would keep them apart). 12 more families are never trained on.
    Metrics (all exact matches are of the whole answer and the end-of-sequence token, by greedy decoding):

    - ``heldout_loss`` and ``alone_exact``: 8 new words per trained family, each question alone;
    - ``fewshot_seen_exact``: the same questions, each preceded (in the same attention segment) by 3 solved
      training questions of its family;
    - ``fewshot_unseen_exact``: 8 questions of each never-trained family, each preceded by 3 solved questions
      of that family: only in-context use of the examples can answer them.

    Hypothesis stated before the first run: ``tfp+pack`` beats ``random+pack`` on ``fewshot_unseen_exact``
    (training with related samples in view teaches the model to use them), and both ``*+sample`` conditions
    stay near 0 there (they never attend across samples). No direction is predicted for ``alone_exact`` and
    ``heldout_loss`` (answers visible in context may also let a model learn less into its weights).

Metrics common to every task:

- ``heldout_loss``: mean cross-entropy per response token (and end-of-sequence token) of the held-out
  samples, each alone (one attention segment per sample: nothing from other samples leaks in);
- exact matches (above) are computed in one teacher-forced pass: greedy decoding reproduces the reference
  span exactly if and only if every reference token of the span is the arg-max of the model's prediction
  given the reference tokens before it (ties go to the lower id, as ``argmax`` does);
- training loss per step (the curves; not comparable between pack and sample attention, where the context
  differs), held-out loss at ``--eval-points`` points of training;
- per condition, what the packing feeds the model: packs, fill, samples per pack, the share of samples with
  an earlier sample of the same group (topic / family) in their pack, segments per batch.

Results: mean and standard deviation over the seeds per task x condition x metric, and per seed the paired
difference TFP minus random for each attention mode (mean, standard deviation, wins). Written to
``<output>/train_effect_<device>.json`` (conditions x seeds x metrics, arguments, versions, git commit, wall
times) and ``<output>/train_effect_<device>.png`` (training-loss curves, held-out loss curves, final metrics).

Your own model and data::

    python -m benchmarks.train_effect --model PATH --train train.jsonl --eval eval.jsonl \\
        --max-len 2048 --steps 500 --batch-tokens 65536 --device cuda --output out/

``--model``: a local causal LM for transformers (``AutoModelForCausalLM``, no download; its tokenizer from the
same folder unless ``--tokenizer``), optionally trained through LoRA (``--lora R``, needs ``peft``);
``--train``/``--eval``: records in any format ``tfp-pack`` reads (JSON, JSONL, Parquet, a saved ``datasets``
folder; alpaca, chat, prompt/completion, text); metrics: ``heldout_loss`` and ``first_line_exact``.
``--embedder hashed|minilm|PATH`` as ``tfp-pack``. ``--smoke``: every condition, 2 seeds, a few steps of a
very small model (the CI test).

Run from the repository root: ``python -m benchmarks.train_effect`` (the default run, ~30 min on 2 CPU cores).
"""
