# The demo workload of docker-compose.yml: `poolwatch demo` with the demo extra (SQLAlchemy,
# requests, httpx, boto3 and moto), OTLP, and a PostgreSQL driver; also `poolwatch upstream`.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY poolwatch ./poolwatch
RUN pip install --no-cache-dir '.[demo,otlp]' 'psycopg[binary]>=3.1'
USER nobody
ENTRYPOINT ["poolwatch"]
CMD ["demo"]
