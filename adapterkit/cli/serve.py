"""``adapterkit serve``: the resident base behind an OpenAI-compatible API and a playground page."""

from __future__ import annotations

import click

from adapterkit.base.load import QUANTIZATIONS
from adapterkit.cli.common import obj, say
from adapterkit.errors import ConfigError, MissingDependency, PocketBookNotFound
from adapterkit.serving.requests import DEFAULT_MAX_TOKENS
from adapterkit.serving.vllm import VLLM_RANKS

#: ``--dtype``'s choices: ``auto`` is :func:`adapterkit.base.load.default_dtype`.
DTYPES = ("auto", "float32", "bfloat16")


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


@click.command("serve")
@click.option("--engine", "engine_name", type=click.Choice(["adapterkit", "vllm"]),
              default="adapterkit", show_default=True,
              help="adapterkit: this process, on CPU or GPU. vllm: vLLM's OpenAI server on GPUs "
                   "(pip install 'adapterkit[vllm]'), names resolved by the library.")
@click.option("--base", required=True,
              help="Base to serve: alias (smollm2-135m), Hub id, folder or .gguf file.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --api-key or --insecure.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--preload", metavar="A,B",
              help="Pocket books (or stacks) to attach before the first request.")
@click.option("--max-attached", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pocket books kept attached; the least recently used leaves first "
                   "(--engine vllm: its --max-loras, pocket books in one batch).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rows decoded together in one step (requests for any pocket books; "
                   "--engine vllm: its --max-num-seqs, passed only when given).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Completions waiting for a row (each prompt × n of a request counts); "
                   "past that the server answers 429, and a single request asking for more "
                   "is refused with 400.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_TOKENS,
              show_default=True,
              help="The most tokens one completion may ask for (max_tokens; more is refused "
                   "with 400), and chat's default length where the context leaves that much.")
@click.option("--api-key", envvar="ADAPTERKIT_API_KEY", show_envvar=True,
              help="Answer only requests with 'Authorization: Bearer KEY'. Prefer the "
                   "environment variable: a command line is visible to other users.")
@click.option("--insecure", is_flag=True,
              help="Listen beyond loopback without a key (anyone who reaches it may use it).")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS),
              help="Load the base quantized, to serve pocket books trained on such a base "
                   "(qlora: 4bit). Default: as the --preload pocket books were trained (else "
                   "unquantized). A pocket book trained on another base is refused (400).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="The resident base's number format. auto: float32 on a CPU, bfloat16 on a "
                   "GPU (float16 where it has no bfloat16). On an H200 float32 decoded 2.2-2.5x "
                   "the tokens/s of bfloat16 (benchmarks/results/train_cuda_h200.md) at twice "
                   "the base's memory. On a quantized base (--quantization, or as the preloads "
                   "were trained): its compute format.")
@click.option("--max-lora-rank", type=click.Choice([str(r) for r in VLLM_RANKS]),
              help="--engine vllm: the rank vLLM reserves for every LoRA slot. Default: the "
                   "smallest that holds every pocket book and saved stack of the base.")
@click.pass_context
def serve_cmd(ctx: click.Context, engine_name: str, base: str, host: str, port: int,
              preload: str | None, max_attached: int, max_batch: int, max_queue: int,
              max_tokens: int, api_key: str | None, insecure: bool, quantization: str | None,
              dtype: str, max_lora_rank: str | None) -> None:
    """Serve BASE to many callers at once, each request naming its own pocket book.

    \b
    Requests for different pocket books are decoded together, one forward of
    the base per step. The `model` field picks what answers:
      BASE_ID (the plain base, see /v1/models)   triage   triage@2
      triage+bedside   triage*1+law*0.5          (stacks: deltas weighted, summed)
    A pocket book loads on first use; one trained or pulled while the
    server runs is servable at once.

    \b
    One base is resident, loaded as the --preload pocket books were trained
    (a qlora one: in 4bit, as `generate` loads it) or as --quantization says;
    a request for a pocket book trained on another is refused (400,
    model_not_servable), and so are --preload pocket books needing different
    bases.

    \b
    Open http://127.0.0.1:8000/ for the library and a playground that answers
    one prompt side by side with the plain base and the pocket books you tick.

    \b
    Examples:
      adapterkit serve --base smollm2-135m --preload triage
      adapterkit serve --base smollm2-135m --quantization 4bit  # qlora pocket books
      curl http://127.0.0.1:8000/v1/models
      curl http://127.0.0.1:8000/v1/chat/completions \\
        -H 'Content-Type: application/json' \\
        -d '{"model": "triage", "max_tokens": 32,
             "messages": [{"role": "user", "content": "Chest pain since this morning."}]}'
      curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "triage+bedside", "prompt": "Patient:", "stream": true}'

    \b
    From Python, with the official client:
      from openai import OpenAI
      client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
      answer = client.chat.completions.create(
          model="triage@2", max_tokens=32, temperature=0,
          messages=[{"role": "user", "content": "Chest pain since this morning."}])
      print(answer.choices[0].message.content)

    \b
    Also: `adapterkit chat --server URL` and `adapterkit swap --server URL`.
    /health answers {"status": "ok"}; /metrics is Prometheus text.

    \b
    Past one machine, on GPUs: --engine vllm runs vLLM's OpenAI server
    (multi-GPU, its LoRA kernels) with the same names and checks; the
    playground page, /api/library, --max-queue and --max-tokens are the
    adapterkit engine's. Checked only on GPUs, not by this project's CPU tests.
      adapterkit serve --engine vllm --base Qwen/Qwen2.5-7B-Instruct --preload triage
    """
    from adapterkit.serving.listen import bind, check_exposure, url_of

    check_exposure(host, api_key, insecure)  # before minutes of loading, not after
    if engine_name == "vllm":
        if quantization is not None or dtype != "auto":
            raise ConfigError("--quantization and --dtype apply only to --engine adapterkit; "
                              "vLLM loads the base as its own options say (see `vllm serve "
                              "--help`: --dtype, --quantization)")
        _serve_vllm(ctx, base=base, host=host, port=port, preload=preload,
                    max_attached=max_attached, max_batch=max_batch, api_key=api_key,
                    max_lora_rank=int(max_lora_rank) if max_lora_rank else None)
        return
    if max_lora_rank is not None:
        raise ConfigError("--max-lora-rank applies only to --engine vllm; the adapterkit engine "
                          "serves every rank as it is")
    try:
        import uvicorn

        from adapterkit.serving.app import create_app
        from adapterkit.serving.engine import Engine
    except ImportError as exc:
        raise MissingDependency(f"adapterkit serve needs {exc.name}: pip install "
                                "'adapterkit[serve]'") from None
    from adapterkit.base.load import load_base
    from adapterkit.cli.common import library

    names = _names(preload)
    if preload and not names:
        raise ConfigError("--preload takes comma-separated names, e.g. triage,law")
    sock = bind(host, port)  # a port in use is refused now, before the base loads
    try:
        state = obj(ctx)
        quantization, why = _quantization(ctx, base, names, quantization)
        import torch

        number_format = None if dtype == "auto" else getattr(torch, dtype)
        if number_format is not None:  # else `why` names the default format or quantization
            why = f"{dtype} (--dtype)" if quantization is None \
                else f"{why}, computing in {dtype} (--dtype)"
        say(f"Loading base {base} in {why}...")
        loaded = load_base(base, quantization=quantization, dtype=number_format,
                           home=state["home"], progress=say)
        engine = Engine(loaded, library(ctx), max_attached=max_attached, max_batch=max_batch,
                        max_queue=max_queue, max_new_tokens_cap=max_tokens)
        try:
            if names:
                say(f"Attaching {', '.join(names)}...")
                engine.preload(names)
            if engine.unmatched:
                say(f"Warning: this base's generation config sets {', '.join(engine.unmatched)}"
                    ", which `adapterkit generate` applies and this server does not (it takes "
                    "the plain argmax at temperature 0): greedy answers may differ between "
                    "the two.")
            engine.start()
            app = create_app(engine, api_key=api_key)
            url = url_of(sock)
            say(f"Serving {engine.base_id} at {url}  (page: {url}/  API: {url}/v1"
                f"{', key required' if api_key else ''}); Ctrl+C stops")
            server = uvicorn.Server(uvicorn.Config(app, log_level="info",
                                                   timeout_graceful_shutdown=5))
            server.run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()


def _quantization(ctx: click.Context, base: str, names: list[str],
                  given: str | None) -> tuple[str | None, str]:
    """The resident base's quantization (``--quantization``, else what the ``--preload``
    pocket books were trained on: refused where they differ) and how the loading line says
    it. Looked up before the base loads."""
    from adapterkit.cli.common import base_precision, library
    from adapterkit.serving.names import parse

    lib = library(ctx)
    books = {n: [lib.get(ref) for ref, _ in parse(n)] for n in names if n != base}
    needed = base_precision(lib, books, fix="serve them from two servers")
    if given is None:
        return needed
    if books and needed[0] != given:  # refused now, not after the base has loaded
        from adapterkit.runtime.session import a_precision

        raise ConfigError(f"--preload {','.join(books)} answers as trained on "
                          f"{a_precision(needed[0])} base, and --quantization {given} loads "
                          f"{a_precision(given)} one: drop --quantization (the preloads choose "
                          "the base), or preload only pocket books of that base")
    return given, f"{given} (--quantization)"


def _serve_vllm(ctx: click.Context, *, base: str, host: str, port: int, preload: str | None,
                max_attached: int, max_batch: int, api_key: str | None,
                max_lora_rank: int | None) -> None:
    """``--engine vllm``: check the machine, the base and the preloads here, then run
    ``vllm serve`` with the resolver of :mod:`adapterkit.serving.vllm` until it stops."""
    import shlex

    from click.core import ParameterSource

    from adapterkit.cli.common import library
    from adapterkit.serving import vllm

    if ctx.get_parameter_source("max_queue") is ParameterSource.COMMANDLINE:
        raise ConfigError("--max-queue does not apply to --engine vllm: vLLM queues requests "
                          "itself (see `vllm serve --help` for its scheduler options)")
    if ctx.get_parameter_source("max_tokens") is ParameterSource.COMMANDLINE:
        raise ConfigError("--max-tokens does not apply to --engine vllm: vLLM bounds a "
                          "request by its context (see `vllm serve --help`: --max-model-len)")
    # vLLM's own default batch (--max-num-seqs) is far above ours: pass ours only when given
    given = ctx.get_parameter_source("max_batch") is ParameterSource.COMMANDLINE
    batch = max_batch if given else None
    vllm.check_runnable()  # no vLLM, no GPU: one line, before any base is resolved
    home = obj(ctx)["home"]
    say(f"Resolving base {base}...")
    served = vllm.ServedBase.of(base, home, progress=say)
    lib = library(ctx)
    state = lib.home / "serving" / "vllm" / f"names-{port}.json"
    state.unlink(missing_ok=True)  # names pinned by an earlier server on this port
    resolver = vllm.AdapterkitResolver(lib, served, state=state, max_rank=max_lora_rank or 512)
    loaded, ranks = {}, [vllm.library_rank(resolver)]
    for name in _names(preload):  # checked here: vLLM loads --lora-modules without asking us
        found = resolver.resolve(name)
        if found is None:
            raise PocketBookNotFound(f"--preload {name}: no pocket book of that name on base "
                                     f"{served.name}; `adapterkit list` shows them")
        loaded[name] = found.path
        ranks.append(vllm.vllm_rank(found.rank))  # a preloaded stack may need more than a book
        resolver.remember(name, found.name)
    if preload and not loaded:
        raise ConfigError("--preload takes comma-separated names, e.g. triage,law")
    resolver.max_rank = max_lora_rank or max(ranks)
    argv, env = vllm.vllm_command(
        served, home=lib.home, host=host, port=port, max_loras=max_attached,
        max_lora_rank=resolver.max_rank, max_num_seqs=batch, preload=loaded,
        api_key=api_key, state=state, program=vllm.program())
    say(f"Starting vLLM (LoRA rank up to {resolver.max_rank}, {max_attached} per batch"
        f"{', key required' if api_key else ''}): {shlex.join(argv)}")
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    refresher = vllm.Refresher(resolver, f"http://{'[' + local + ']' if ':' in local else local}"
                                         f":{port}", api_key=api_key)
    code = vllm.run(argv, env, refresher=refresher)
    if code:
        raise click.ClickException(f"vllm serve exited with code {code}; its output above says "
                                   "why")
