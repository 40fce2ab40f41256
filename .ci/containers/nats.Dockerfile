# NATS from this machine's nats-server (see build-images). Like the official image: /nats-server
# as the entrypoint with nats-server.conf as its default argument, so that `--jetstream` (what
# the harness passes) replaces the arguments, not the program.
FROM scratch
COPY rootfs/ /
ENV PATH=/
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["--config", "nats-server.conf"]
