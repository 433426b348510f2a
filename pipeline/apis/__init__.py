"""Certifying commercial vision APIs by querying them (Salman et al. 2020, Section 4).

Plain Python and PyTorch, no Ray (the Ray layer is actors/api_sampler.py and
jobs/certify_api.py). One image's queries go through the same driver as a model's votes
(`pipeline.certify.run.CertifyRun`); what is particular to an API is grouped by concept, each
group importing only the ones below it (contracts in pyproject.toml). A group is as few
modules as its concepts: one image's path through the per-image loop reads the sampler, one
module of each group (run/state, books/ledger, query) and the provider (its adapter and base).

the run (run/): one `certify-api` invocation, in the driver
    run/prepare      config loading, image selection, the optional denoiser, the run identity
                     (so a resume with other settings is refused)
    run/modes        fixed n or sequential: which CertifyRuns an invocation makes of the API
                     sampler, and what its summary says
    run/state        one image's account: the queries it needs (clean, n0, n) cut into work
                     units of one noise chunk each, the answers so far, the vote rows they make
                     (per image, or per chunk with the clean answer as the label: sequential);
                     vote rows rebuilt from the query log (any n0 <= n0, n <= n)

the books (books/): what was asked, answered, spent
    books/ledger     the books written, by the one place a call is granted: the budget (max
                     queries, cost and tokens, per invocation and per run, reserved per attempt
                     -- a chat call: its largest prompt so far plus the answer cap -- so that
                     no limit can be passed), the call journal (every call written before it
                     is sent and when it is answered, so a kill never loses or repeats a paid
                     answer), which answers a provider bills, the rate limit's slot
    books/querylog   the books read: the journals and their compacted Parquet log of every
                     call, the per-query view, what the run spent

the query (query.py): one query in an actor, in order
    the noisy image  x + delta (optionally denoised), addressed like the local engine's noise,
                     so a resumed run sends the very same images; clipped, 8 bits, lossless PNG
    when it is sent  query starts per second (and per minute), one limit for the whole job
                     (held by the ledger), slower after throttling; a grant (`Permit`) per
                     attempt, back-off with jitter
    the worker       a unit's queries in parallel threads, one result row per query

shared by the three groups
    config       the certify-api settings (no secrets: only the names of variables)
    errors       what can go wrong with a query, sorted by what to do (retry, stop, record);
                 an error's `kind` is the status its call is journaled with
    secrets      credentials scrubbed from every error text
    providers/   AWS Rekognition (boto3), Google Cloud Vision (google-cloud-vision, REST),
                 Azure AI Vision (REST), Clarifai (REST): image -> labels with scores (base:
                 what every adapter returns, and the send gate each calls just before its
                 bytes leave, so the rate limit holds on the provider's clock); and
                 vision-language models behind OpenAI-compatible chat APIs (openai_chat:
                 image + prompt -> one class, refusals and answers outside the classes a
                 "no class" vote)
    chat_settings  the chat model, prompt, classes, temperature/seed, token prices and
                 per-minute limits of the `openai` provider (all but the prices and limits
                 in the run identity)

apart
    emulator/    `dsmooth api-emulator`: a local stand-in for the providers' wire protocols,
                 with a classifier and injected faults; it shares no code with the client
"""
