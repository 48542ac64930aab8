"""The HTTP API over :class:`fedrec.fusion.pipeline.Recommender`: ``GET /health`` and
``POST /recommend``.

A thin adapter in the Flower-app style: requests and responses are pydantic models (so the
OpenAPI schema at ``/docs`` documents them) converted to and from one ``recommend`` call. A bad
request never raises across the network: a body of the wrong shape gets FastAPI's 422 with the
field at fault, and a well-formed request the catalogue cannot answer (unknown item, category or
feature, k beyond the catalogue) gets a 400 whose ``detail`` says what to fix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fedrec.fusion.pipeline import RecallIndex, Recommender, RecommendError

MAX_HISTORY = 10_000  # items per request; only the most recent max_len are used
MAX_K = 1_000  # bounds the response size whatever the catalogue


class RecommendRequest(BaseModel):
    """A user, given as their history, and what to return."""

    model_config = ConfigDict(extra="forbid")

    history: list[str] = Field(
        default_factory=list, max_length=MAX_HISTORY,
        description="raw item ids the user interacted with, oldest first; empty = cold start",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="items to return (at most the catalogue)")
    category: str | None = Field(None, description="only recommend items of this category")
    exclude_seen: bool = Field(True, description="never recommend items in the history")
    user_features: dict[str, str] = Field(
        default_factory=dict,
        description="categorical user features, e.g. {'gender': 'F'}; omitted ones use the "
                    "most common value",
    )


class RecommendedItem(BaseModel):
    item: str = Field(description="raw item id")
    title: str
    category: str
    score: float = Field(description="fused score (training popularity on a cold start)")
    explanation: dict[str, float] = Field(
        description="each task's normalised score of the item ('popularity' on a cold start)"
    )


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    cold_start: bool = Field(description="true when the empty history got popular items")


class Health(BaseModel):
    status: str
    items: int = Field(description="catalogue size")
    tasks: list[str]
    fusion: str = Field(description="fusion method in use")


class ErrorBody(BaseModel):
    detail: str


def create_app(run_dir: str | Path, *, recall_index: RecallIndex = "auto") -> FastAPI:
    """An app serving the run directory's models (loaded once, here, with the recall index)."""
    return create_app_for(Recommender.from_run_dir(run_dir, recall_index=recall_index))


def create_app_for(rec: Recommender) -> FastAPI:
    """An app serving an already built recommender (thread-safe: it is read-only)."""
    app = FastAPI(title="fedrec", summary="federated multi-task recommendations")

    @app.exception_handler(RecommendError)
    async def bad_request(request: Request, err: RecommendError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(err)})

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the input, and a NaN in it cannot be written as JSON (a
        # 500): say where and what, never the value
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))}
                  for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", items=len(rec.catalogue), tasks=list(rec.models),
                      fusion=rec.fuser.method)

    @app.post("/recommend", responses={400: {"model": ErrorBody}})
    def recommend(req: RecommendRequest) -> RecommendResponse:
        rows = rec.recommend(req.history, req.k, exclude_seen=req.exclude_seen,
                             category=req.category, user_features=req.user_features)
        return RecommendResponse(items=[RecommendedItem(**r) for r in rows],
                                 cold_start=not req.history)

    return app
