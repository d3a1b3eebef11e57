# Test-only stand-in for apache/kafka:4.0.2 (registries of images cannot be reached here): the
# same Kafka 4.0.2 jars the local test broker runs (resolved from Maven Central by
# devtools' pom.xml into .cache/kafka by scripts/bootstrap) on Debian's JRE. It reads the
# apache/kafka image's environment (KAFKA_* -> server.properties, CLUSTER_ID), so the compose
# file's `kafka` service runs unchanged. Context: the repository root.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
# The JRE's postinst links its man pages into /usr/share/man/man1, which slim bases leave out.
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends default-jre-headless \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1000 --home-dir /var/lib/kafka --create-home --shell /usr/sbin/nologin kafka
ARG KAFKA_LIBS=.cache/kafka/libs-4.0.2
COPY ${KAFKA_LIBS} /opt/kafka/libs
COPY tests/containers/kafka-entrypoint.sh /opt/kafka/entrypoint.sh
USER kafka
EXPOSE 9092
ENTRYPOINT ["/opt/kafka/entrypoint.sh"]
