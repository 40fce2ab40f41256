# RabbitMQ from this machine's Erlang release (see build-images): /usr/lib/rabbitmq and
# /usr/lib/erlang as installed, the sh tools the start scripts call, and their libraries. Like
# the official image: logs on the console, guest/guest allowed from any address, port 5672.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/lib/rabbitmq/bin:/usr/lib/erlang/bin:/usr/local/bin:/usr/bin:/bin \
    HOME=/var/lib/rabbitmq \
    RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia \
    RABBITMQ_LOG_BASE=/var/lib/rabbitmq/log \
    RABBITMQ_LOGS=- \
    RABBITMQ_CONFIG_FILE=/etc/rabbitmq/rabbitmq.conf \
    RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins \
    LANG=C.UTF-8
WORKDIR /var/lib/rabbitmq
EXPOSE 5672 15692
CMD ["rabbitmq-server"]
