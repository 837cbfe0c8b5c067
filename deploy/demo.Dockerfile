# The demo workload of docker-compose.yml: `poolwatch demo` with the SQLAlchemy, Prometheus
# and OTLP extras and a PostgreSQL driver.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY poolwatch ./poolwatch
RUN pip install --no-cache-dir '.[sqlalchemy,prometheus,otlp]' 'psycopg[binary]>=3.1'
USER nobody
ENTRYPOINT ["poolwatch"]
CMD ["demo"]
