# Redis from this machine's redis-server (see build-images). Like the official image: the server
# in /usr/local/bin, /data as the working directory, protected mode off (the official image
# compiles it off) so that a published port accepts connections from the host.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
