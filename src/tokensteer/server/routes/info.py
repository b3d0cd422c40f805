"""The model list, tokenizer routes, health, metrics, and what the playground needs to know."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tokensteer.server.auth import check_key
from tokensteer.server.errors import APIError
from tokensteer.server.limits import read_json
from tokensteer.server.schemas import Strict, parse

router = APIRouter()


class TokenizeRequest(Strict):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    tokens: list[int]


def model_card(ctx) -> dict:
    return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "tokensteer"}


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.ctx)]}


@router.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
async def model(name: str, request: Request):
    ctx = request.app.state.ctx
    if name != ctx.model_id:
        raise APIError(404, f"the model {name!r} is not served here; this server runs {ctx.model_id!r}", param="model", code="model_not_found")
    return model_card(ctx)


@router.post("/tokenize", dependencies=[Depends(check_key)])
async def tokenize(request: Request):
    ctx = request.app.state.ctx
    req: TokenizeRequest = parse(TokenizeRequest, await read_json(request, ctx.limits))
    tok = ctx.lm.tokenizer
    ids = await anyio.to_thread.run_sync(lambda: tok.encode(req.prompt, add_bos=req.add_special_tokens))
    out = {"count": len(ids), "max_model_len": ctx.lm.context_length, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [tok.token_text(i) for i in ids]
    return out


@router.post("/detokenize", dependencies=[Depends(check_key)])
async def detokenize(request: Request):
    ctx = request.app.state.ctx
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_json(request, ctx.limits))
    size = ctx.lm.tokenizer.vocab_size
    bad = [i for i in req.tokens if not 0 <= i < size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0–{size - 1})", param="tokens")
    return {"prompt": ctx.lm.tokenizer.decode(req.tokens)}


@router.get("/health")
async def health(request: Request):
    ctx = request.app.state.ctx
    if ctx.closed:
        return APIError(503, "the server is shutting down").response()
    return {"status": "ok", "model": ctx.model_id, "backend": ctx.lm.name}


@router.get("/metrics")
async def metrics(request: Request):
    ctx = request.app.state.ctx
    body, ctype = ctx.metrics.render(ctx.engine.stats(), ctx.gate.active)
    return Response(body, media_type=ctype)


@router.get("/v1/tokensteer/options", dependencies=[Depends(check_key)])
async def options(request: Request):
    """Recipes, guides, vectors and limits, for the playground (and any client that wants them)."""
    from tokensteer.formula.guides import GUIDES
    from tokensteer.formula.recipes import RECIPES

    ctx = request.app.state.ctx
    lim = ctx.limits
    return {
        "model": ctx.model_id,
        "backend": ctx.lm.name,
        "capabilities": sorted(ctx.lm.capabilities),
        "recipes": [{"name": r.name, "usage": r.usage(), "formula": r.formula(), "doc": r.doc} for r in RECIPES.values()],
        "guides": sorted(GUIDES),
        "vectors": ctx.vectors.listing(),
        "stores": ctx.stores.listing(),
        "limits": {"max_tokens": lim.max_tokens, "max_n": lim.max_n, "max_prompt_tokens": lim.max_prompt_tokens,
                   "max_formula_chars": lim.max_formula_chars},
    }
