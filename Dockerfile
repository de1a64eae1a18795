# ipguard: small, non-root, read-only-root-filesystem friendly.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY webhook ./webhook
# uvloop: `ipguard serve` runs on it when installed (it logs which loop it runs on).
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt '.[uvloop]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
# No shell work at run time, no writes but to the mounted certificate volume (read-only) and stderr.
USER 65532:65532
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["ipguard"]
CMD ["serve"]
